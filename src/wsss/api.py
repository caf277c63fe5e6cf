"""The Python API: ``wsss.load(run)`` gives a :class:`Segmenter` that predicts masks, probabilities, the
classes found and CAMs for one image (a PIL image, a path, a numpy array or a tensor)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsss.data.classes import ClassSpec
from wsss.engine.checkpoint import CheckpointError
from wsss.evaluation.inference import cams_at, fit_max_side, probs_at, summarize_mask


@dataclass(frozen=True)
class Prediction:
    """One image's prediction at its displayed size (H, W).

    Attributes:
        mask: (H, W) uint8 indices into ``classes``.
        probs: (K, H, W) float32 class probabilities (sum 1 over K at every pixel).
        classes: the K class names (``background`` first when the run has one).
        found: foreground classes that own at least one pixel of ``mask``, by decreasing share.
        shares: each class present in ``mask`` -> its fraction of the pixels.
    """

    mask: np.ndarray
    probs: np.ndarray
    classes: tuple[str, ...]
    found: tuple[str, ...]
    shares: dict[str, float]


def load_run(target: str | Path, overrides: list[str] | tuple[str, ...] = (), device: str | None = None):
    """(cfg, method, classes, device, run_dir) from a run directory or a checkpoint inside one.

    ``overrides`` are ``--key value`` strings applied over the run's ``config.yaml`` (e.g. ``--eval.flip
    true``). The checkpoint holds every weight, so no pretrained file is read."""
    from wsss.config import load_config
    from wsss.engine.checkpoint import load_checkpoint

    p = Path(target)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run directory or checkpoint")
    if p.suffix == ".safetensors":
        return _load_export(p, overrides, device)
    ckpt = p / "checkpoints" / "last.pt" if p.is_dir() else p
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: no checkpoint in this run directory (training did not save one yet)")
    run_dir = ckpt.parent.parent
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: no config.yaml next to the checkpoint (give a run directory)")
    cfg = load_config(cfg_path, ["--model.weights", "none", *overrides])
    saved = load_checkpoint(ckpt)
    if not isinstance(saved.get("classes"), list):
        raise CheckpointError(f"{ckpt}: has no class list (not a checkpoint wsss wrote)")
    classes = ClassSpec(tuple(saved["classes"]), background=bool(saved["background"]))
    method, dev = _instantiate(cfg, classes, saved["model"], device, ckpt)
    return cfg, method, classes, dev, run_dir


def _instantiate(cfg, classes: ClassSpec, state: dict, device: str | None, source: Path):
    """(method in eval mode on its device, device) built from ``cfg`` with the weights ``state`` (read from
    ``source``, named in errors)."""
    from wsss.build import build_method
    from wsss.engine.checkpoint import load_weights
    from wsss.engine.runtime import pick_device

    method = build_method(cfg, classes)
    load_weights(method, state, source)
    dev = pick_device(device or cfg.train.device)
    method.to(dev).eval()
    return method, dev


def _load_export(path: Path, overrides, device):
    """load_run for a ``wsss export --format safetensors`` file: config, classes and weights all inside."""
    import json
    import tempfile

    from wsss.config import load_config
    from wsss.export import read_safetensors

    state, meta = read_safetensors(path)
    with tempfile.TemporaryDirectory() as d:  # load_config reads files (a recipe's _base_ is relative to one)
        (Path(d) / "config.yaml").write_text(meta["config"])
        cfg = load_config(Path(d) / "config.yaml", ["--model.weights", "none", *overrides])
    classes = ClassSpec(tuple(json.loads(meta["classes"])), background=bool(json.loads(meta["background"])))
    method, dev = _instantiate(cfg, classes, state, device, path)
    return cfg, method, classes, dev, path.parent


def image_tensor(image) -> torch.Tensor:
    """A normalised (1, 3, H, W) float tensor from a PIL image, a path, an (H, W, 3) / (H, W) numpy array
    (uint8, or float in [0, 1]) or a (3, H, W) / (1, 3, H, W) tensor (uint8, or float in [0, 1]).

    Paths and PIL images are read as displayed (EXIF orientation applied), as in training."""
    from PIL import Image

    from wsss.data.io import WIDE_MODES, _upright, read_image
    from wsss.data.transforms import normalize

    if isinstance(image, (str, Path)):
        image = read_image(image)
    elif isinstance(image, Image.Image):
        if image.mode in WIDE_MODES:
            raise ValueError(f"PIL image of mode {image.mode} (16/32-bit): convert it to 8-bit RGB")
        image = np.asarray(_upright(image).convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"image array of shape {image.shape}: expected (H, W, 3) RGB or (H, W) grey")
        image = torch.from_numpy(np.array(image[:, :, :3])).permute(2, 0, 1)  # a copy: arrays may be read-only
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image of type {type(image).__name__}: give a PIL image, a path, a numpy array or a tensor")
    x = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"image tensor of shape {tuple(image.shape)}: expected (3, H, W) or (1, 3, H, W) RGB")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("float image values must lie in [0, 1] (or give uint8 0-255)")
    return normalize(x)[None]


class Segmenter:
    """A trained run ready to predict: ``wsss.load(run_dir).predict(image)``.

    Uses the run's evaluation protocol (``eval.scales``, ``flip``, ``reduce``, ``crf`` of its config or of
    the ``overrides`` given to :func:`load`)."""

    def __init__(self, cfg, method, classes: ClassSpec, device: torch.device, run_dir: Path) -> None:
        self.cfg, self.method, self.spec, self.device, self.run_dir = cfg, method, classes, device, run_dir

    @property
    def classes(self) -> tuple[str, ...]:
        """The K names of the mask indices (``background`` first when the run has one)."""
        return tuple(self.spec.seg_names)

    @torch.no_grad()
    def probs(self, image, max_side: int = 0) -> torch.Tensor:
        """Class probabilities (K, H, W) at the image's size; with ``max_side`` the network sees the image
        downscaled to that longer side and the probabilities are upsampled back."""
        return probs_at(self.method, image_tensor(image).to(self.device), self.cfg.eval, max_side)[0].cpu()

    def predict(self, image, max_side: int = 0) -> Prediction:
        """The mask, per-class probabilities and classes found for one image (see :class:`Prediction`)."""
        p = self.probs(image, max_side)
        mask = p.argmax(0).to(torch.uint8).numpy()
        found, shares = summarize_mask(mask, self.spec)
        return Prediction(mask, p.numpy(), self.classes, found, shares)

    @torch.no_grad()
    def cams(self, image, max_side: int = 0) -> np.ndarray:
        """CAMs (C, H, W) float32 in [0, 1], one per foreground class (``classes`` without background), at
        the image's size. Methods without a CAM head (``fully_supervised``) raise ValueError."""
        if not self.method.has_cams:
            raise ValueError(f"{self.cfg.method_name}: this method has no CAM head")
        return cams_at(self.method, image_tensor(image).to(self.device), max_side)[0].cpu().numpy()

    @torch.no_grad()
    def tags(self, image, max_side: int = 0) -> dict[str, float]:
        """Image-level score in [0, 1] of each foreground class (the method's classifier when it has one)."""
        x = fit_max_side(image_tensor(image).to(self.device), max_side)
        s = self.method.predict_tags(x)[0].float().cpu().tolist()
        return dict(zip(self.spec.names, s))


def load(target: str | Path, device: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Segmenter:
    """A :class:`Segmenter` from a run directory (its ``checkpoints/last.pt``) or a checkpoint file.

    Args:
        target: run directory or checkpoint path (weights-only load; the run's ``config.yaml`` is read).
        device: ``cpu``, ``cuda``, ... (default: the run's ``train.device``, ``auto`` = CUDA when present).
        overrides: ``--key value`` config overrides, e.g. ``["--eval.scales", "[1.0,1.5]"]``.
    """
    return Segmenter(*load_run(target, list(overrides), device))
