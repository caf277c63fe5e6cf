"""Deterministic data streams: a training stream resumable at any iteration, and sharded evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from wsss.data.base import SegDataset


class StreamSampler(Sampler):
    """Endless stream of ``(index, sample_seed)`` keys for one process.

    The global stream visits a fresh permutation of the dataset each epoch (seeded by (seed, epoch)).
    Global position ``p`` carries seed (seed, p), so augmentation does not depend on worker count or
    on where a run was resumed. With ``world`` processes reading ``micro`` samples per forward, rank
    ``r``'s k-th micro-batch covers positions ``start + k*micro*world + r*micro + [0, micro)``.
    """

    def __init__(self, n: int, seed: int, micro: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.n, self.seed, self.micro, self.rank, self.world, self.start = n, seed, micro, rank, world, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k = 0
        epoch, perm = -1, np.empty(0, dtype=np.int64)  # drawn at the first position (epoch >= 0)
        while True:
            base = self.start + k * self.micro * self.world + self.rank * self.micro
            for p in range(base, base + self.micro):
                e = p // self.n
                if e != epoch:
                    epoch = e
                    perm = np.random.default_rng([self.seed, e]).permutation(self.n)
                yield int(perm[p % self.n]), int(np.random.SeedSequence([self.seed, p]).generate_state(1)[0])
            k += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...``: every sample evaluated exactly once over all processes."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


class SizeBatchSampler(Sampler):
    """Batches of up to ``batch`` indices of one image size from the shard ``rank, rank + world, ...``:
    images of different sizes are never stacked into one batch (a user's folder mixes them), and a split
    of one size gives exactly the shard's consecutive batches.

    Args:
        sizes: (H, W) of every image of the dataset, by index.
        batch: largest batch.
        rank, world: this process's shard.
    """

    def __init__(self, sizes: list[tuple[int, int]], batch: int, rank: int = 0, world: int = 1) -> None:
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(rank, len(sizes), world):
            h, w = sizes[i]
            groups.setdefault((h, w), []).append(i)
        self.batches = [g[k : k + batch] for g in groups.values() for k in range(0, len(g), batch)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def train_loader(ds: SegDataset, micro: int, seed: int, start: int, rank: int, world: int, workers: int) -> DataLoader:
    """Endless loader of micro-batches starting at global sample position ``start``."""
    return DataLoader(
        ds,
        batch_size=micro,
        sampler=StreamSampler(len(ds), seed, micro, rank, world, start),
        num_workers=workers,
        drop_last=True,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),  # keeps the global torch RNG untouched
    )


def eval_loader(ds: SegDataset, batch: int, rank: int, world: int, workers: int) -> DataLoader:
    """Sharded, ordered evaluation loader; with ``batch`` > 1, batches of one image size
    (:class:`SizeBatchSampler`, sizes read from the files' headers by ``ds.image_size``)."""
    gen = torch.Generator().manual_seed(0)
    if batch > 1 and hasattr(ds, "image_size"):
        sampler = SizeBatchSampler([ds.image_size(i) for i in range(len(ds))], batch, rank, world)
        return DataLoader(ds, batch_sampler=sampler, num_workers=workers, generator=gen)
    return DataLoader(ds, batch_size=batch, sampler=ShardSampler(len(ds), rank, world), num_workers=workers,
                      generator=gen)  # fmt: skip
