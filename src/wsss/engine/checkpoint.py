"""Atomic checkpoints with everything exact resume needs; loaded with ``weights_only=True``."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from wsss.data.io import atomic_write


class CheckpointError(ValueError):
    """A checkpoint file that is missing or cannot be read as a wsss checkpoint."""


def rng_state() -> dict:
    """Python, NumPy and torch (CPU + CUDA) RNG states as tensors/plain types."""
    py = random.getstate()
    np_state = np.random.get_state()
    st = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    v, s, g = st["python"]
    random.setstate((v, tuple(s), g))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temp file, then rename)."""
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable wsss checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """``checkpoints/last.pt`` of a run directory, or None."""
    p = Path(run_dir) / "checkpoints" / "last.pt"
    return p if p.is_file() else None
