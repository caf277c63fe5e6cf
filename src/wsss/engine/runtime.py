"""What a run needs from the machine and the process: seeds, the device and its autocast dtype, the
environment record of ``env.json``, and reading a step's numbers back to the host in one copy."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch

from wsss.config import ConfigError
from wsss.utils import dist


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a ConfigError for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'train.device': unknown device {name!r} (auto | cpu | cuda | cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device': {name} but this machine has no usable CUDA GPU (auto or cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"config key 'train.device': {name} but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp`` on ``device`` (None: fp32)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode in ("auto", "bf16"):
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    raise ConfigError(f"config key 'train.amp': unknown value '{mode}' (auto | bf16 | fp16 | off)")


def git_state() -> tuple[str, bool]:
    """(commit SHA, whether tracked files differ from it) of the source tree; ("", False) outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except Exception:
        return "", False


def env_info(weights_source: str) -> dict:
    """Versions, git SHA, world size and weights source, for env.json."""
    import timm
    import torchvision

    sha, dirty = git_state()
    from wsss import __version__

    return {
        "wsss": __version__, "git_sha": sha, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "git_dirty": dirty, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "world_size": dist.world_size(),
        "weights_source": weights_source, "started": datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
    }  # fmt: skip


def host_floats(values: list) -> list[float]:
    """Python floats of scalar tensors (any device) and numbers, in order, with one device-to-host copy for
    all the tensors."""
    tensors = [v.reshape(()) for v in values if torch.is_tensor(v)]
    copied = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else [])
    return [next(copied) if torch.is_tensor(v) else float(v) for v in values]
