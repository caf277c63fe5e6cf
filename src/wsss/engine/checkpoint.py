"""Atomic checkpoints with everything exact resume needs; loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import cast

import numpy as np
import torch

from wsss.utils.files import atomic_write


class CheckpointError(ValueError):
    """A checkpoint file that is missing or cannot be read as a wsss checkpoint."""


def rng_state() -> dict:
    """Python, NumPy and torch (CPU + CUDA) RNG states as tensors/plain types."""
    py = random.getstate()
    np_state = cast(tuple, np.random.get_state())  # the legacy tuple (name, keys, pos, has_gauss, gauss)
    saved = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        saved["cuda"] = torch.cuda.get_rng_state_all()
    return saved


def set_rng_state(saved: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    v, s, g = saved["python"]
    random.setstate((v, tuple(s), g))
    n = saved["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temp file, then rename)."""
    atomic_write(path, lambda p: torch.save(state, p))


def save_rotating(ckpt_dir: str | Path, state: dict, it: int, keep: int) -> Path:
    """Write ``ckpt_dir/last.pt``; with ``keep`` > 1 the checkpoint is written as ``iter_NNNNNN.pt``, the
    newest ``keep`` of those are kept, and last.pt is a hard link to the newest (no second copy on disk;
    a copy where links are not supported), replaced atomically. Returns last.pt's path."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.pt"
    if keep <= 1:
        save_checkpoint(last, state)
        return last
    named = ckpt_dir / f"iter_{it:06d}.pt"
    save_checkpoint(named, state)
    tmp = ckpt_dir / f".last.pt.{os.getpid()}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(named, tmp)
    except OSError:
        shutil.copyfile(named, tmp)
    os.replace(tmp, last)
    ours = [p for p in ckpt_dir.glob("iter_*.pt") if re.fullmatch(r"iter_\d+\.pt", p.name)]  # never a user's file
    named_ckpts = sorted(ours, key=lambda p: int(p.stem[5:]))
    for old in named_ckpts[:-keep]:
        old.unlink()
    return last


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``); a CheckpointError
    for a missing, empty, truncated or foreign file, or one without the ``model`` weights (a bare state_dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable wsss checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(f"{path}: not a wsss checkpoint (no 'model' weights: a bare state_dict or another "
                              "program's file); give a run directory or a checkpoint wsss wrote")  # fmt: skip
    return saved


def load_weights(module: torch.nn.Module, state: dict, source: str | Path) -> None:
    """``module.load_state_dict(state)`` with a one-line CheckpointError naming ``source`` when the weights
    do not fit (another backbone, class count or module list) instead of PyTorch's multi-line report. A
    submodule with an ``upgrade_state_dict(state, prefix) -> state`` first renames its old keys."""
    state = dict(state)
    for name, m in module.named_modules():  # modules whose parameters were renamed read older checkpoints
        upgrade = getattr(m, "upgrade_state_dict", None)
        if callable(upgrade):
            state = upgrade(state, f"{name}." if name else "")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        example = (f"'{shapes[0]}' is {tuple(state[shapes[0]].shape)} there, {tuple(own[shapes[0]].shape)} here"
                   if shapes else f"e.g. '{(missing or unexpected)[0]}'")  # fmt: skip
        raise CheckpointError(f"{source}: its weights do not fit this model ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected, {len(shapes)} of another shape; {example}): it was trained with another "
                              "backbone, class count or module list")  # fmt: skip
    module.load_state_dict(state)
