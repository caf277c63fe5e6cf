"""torchrun environment, rank-0 helpers and reductions. Single process needs no set-up."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0."""
    return rank() == 0


def init_from_env(device: torch.device | None = None) -> torch.device:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); returns this rank's device.

    NCCL on CUDA, gloo on CPU; the CUDA device is LOCAL_RANK.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if ws > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no-op single process); returns ``t``."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors (N, ...) from all processes along dim 0."""
    if world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return torch.cat(out, 0)


def all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors (N_r, ...) whose first dimension differs between processes, in rank order."""
    if world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    counts = all_gather_cat(n).tolist()
    pad = t.new_zeros((max(counts) - t.shape[0], *t.shape[1:]))
    full = all_gather_cat(torch.cat([t, pad], 0)).view(len(counts), max(counts), *t.shape[1:])
    return torch.cat([full[r, :c] for r, c in enumerate(counts)], 0)


def barrier() -> None:
    """Synchronise processes (no-op single process)."""
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
