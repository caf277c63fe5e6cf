"""Per-class memory bank of embeddings from earlier images (STCL's temporal memory, RCA's regional memory)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassMemoryBank(nn.Module):
    """One circular queue of ``size`` unit embeddings per class, stored as buffers (saved in checkpoints).

    ``push`` writes each class's new entries at its pointer: with ``momentum`` 0 the oldest entry is
    replaced (FIFO); with ``momentum`` m > 0 a slot already filled becomes ``normalize(m * old + (1 - m)
    * new)`` (RCA's momentum update). Callers gather entries across processes before pushing, so every
    process holds the same bank.

    Args:
        num_classes: C queues.
        size: M entries per class.
        dim: embedding width E.
        momentum: 0 for FIFO replacement, else the slot momentum.
    """

    # buffers (register_buffer), declared for the type checker
    feats: torch.Tensor  # (C, M, E)
    ptr: torch.Tensor  # (C,) long
    count: torch.Tensor  # (C,) long

    def __init__(self, num_classes: int, size: int, dim: int, momentum: float = 0.0) -> None:
        super().__init__()
        self.size, self.momentum = size, momentum
        self.register_buffer("feats", torch.zeros(num_classes, size, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def enqueue(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """Queue embeddings (N, E) of classes ``labels`` (N,) (detached) for the next :meth:`flush`."""
        self._pending.append((emb.detach(), labels))

    def discard_pending(self) -> None:
        """Drop what was queued since the last flush (its step was skipped)."""
        self._pending.clear()

    @torch.no_grad()
    def flush(self) -> None:
        """Push everything queued since the last flush (all micro-batches), gathered from all processes
        in rank order, so every process holds the same bank and a 2-process run writes what one process
        with 2 accumulation micro-batches writes."""
        from wsss.utils import dist

        dim, dev = self.feats.shape[-1], self.feats.device
        if self._pending:
            emb = torch.cat([e.float() for e, _ in self._pending]).to(dev)
            lab = torch.cat([k for _, k in self._pending]).to(dev)
        else:
            emb, lab = torch.zeros(0, dim, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
        self._pending.clear()
        emb, lab = dist.all_gather_varlen(emb), dist.all_gather_varlen(lab)
        if lab.numel():
            self.push(emb, lab)

    @torch.no_grad()
    def push(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """Enqueue embeddings (N, E) of classes ``labels`` (N,), in order (later ones are newer)."""
        M = self.size
        emb = F.normalize(emb.detach().to(self.feats), dim=-1)
        for c in labels.unique().tolist():
            e = emb[labels == c][-M:]  # more than M new entries: only the newest M survive
            k = e.shape[0]
            slots = (self.ptr[c] + torch.arange(k, device=e.device)) % M
            if self.momentum > 0:
                filled = (slots < self.count[c])[:, None]
                old = self.feats[c, slots]
                e = torch.where(filled, F.normalize(self.momentum * old + (1 - self.momentum) * e, dim=-1), e)
            self.feats[c, slots] = e
            self.ptr[c] = (self.ptr[c] + k) % M
            self.count[c] = torch.clamp(self.count[c] + k, max=M)

    def filled(self, min_count: int = 1) -> torch.Tensor:
        """(C, M) bool: slots holding an entry, in classes holding at least ``min_count`` entries."""
        M = self.feats.shape[1]
        ok = self.count >= min_count
        return (torch.arange(M, device=self.feats.device)[None] < self.count[:, None]) & ok[:, None]

    def entries(self, min_count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled entries (L, E) and their classes (L,), of classes holding at least ``min_count``."""
        C, M, _ = self.feats.shape
        mask = self.filled(min_count)
        labels = torch.arange(C, device=self.feats.device)[:, None].expand(C, M)
        return self.feats[mask], labels[mask]
