"""Multi-scale + flip inference of segmentation logits (whole-image or in sliding windows), and one batch's
probabilities and CAMs under a size cap (what `wsss predict` and the Python API return)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wsss.cam.cam import rescale
from wsss.data.classes import ClassSpec

WINDOW_CHUNK = 8  # windows per forward: bounds the memory of a huge image whatever its number of windows


def window_starts(side: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` px every ``stride`` px over ``side`` px, the last one flush with
    the end so every pixel is covered (a single 0 when the window spans the side)."""
    if window >= side:
        return [0]
    starts = list(range(0, side - window, stride))
    return starts + [side - window]


@torch.no_grad()
def sliding_seg(method, images: torch.Tensor, window: int, overlap: float = 1 / 3) -> torch.Tensor:
    """Seg logits (B, K, H, W) of normalised ``images`` (B, 3, H, W) from ``window`` x ``window`` crops
    (clipped to the image's sides) every ``window * (1 - overlap)`` px, each pixel the mean of the windows
    covering it (mmsegmentation's slide mode). The network sees the image at its own resolution, in
    pieces of the training crop's size, instead of a whole large image at once."""
    B, _, H, W = images.shape
    wh, ww = min(window, H), min(window, W)
    stride = max(1, round(window * (1 - overlap)))
    pos = [(y, x) for y in window_starts(H, wh, stride) for x in window_starts(W, ww, stride)]
    total: torch.Tensor | None = None
    count = images.new_zeros((1, 1, H, W), dtype=torch.float32)
    for i in range(0, len(pos), WINDOW_CHUNK):
        chunk = pos[i : i + WINDOW_CHUNK]
        crops = torch.cat([images[..., y : y + wh, x : x + ww] for y, x in chunk])  # (len(chunk) * B, 3, wh, ww)
        out = method.predict_seg(crops).float()
        if total is None:
            total = out.new_zeros((B, out.shape[1], H, W))
        for j, (y, x) in enumerate(chunk):
            total[..., y : y + wh, x : x + ww] += out[j * B : (j + 1) * B]
            count[..., y : y + wh, x : x + ww] += 1
    if total is None:  # window_starts gives every side at least one window
        raise ValueError(f"no windows over a {H} x {W} image")
    return total / count


@torch.no_grad()
def multi_scale_seg(
    method, images: torch.Tensor, scales: tuple[float, ...] = (1.0,), flip: bool = False, reduce: str = "mean",
    window: int = 0, overlap: float = 1 / 3,
) -> torch.Tensor:  # fmt: skip
    """Seg logits (B, K, H, W) over ``scales`` (each resized back to the input size). ``reduce`` mean: the
    mean over scales and flips. ``max``: ToCo's test protocol (``tools/infer_seg_voc.py``), per scale the
    sum of the image's and its flip's logits, then the elementwise maximum over scales. ``window`` > 0: each
    scaled image is predicted by :func:`sliding_seg` in windows of that side."""
    B, _, H, W = images.shape
    total: torch.Tensor | None = None
    for s in scales:
        x = rescale(images, s)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        y = sliding_seg(method, x, window, overlap) if window > 0 else method.predict_seg(x)
        y = F.interpolate(y.float(), size=(H, W), mode="bilinear", align_corners=False)
        y = y[:B] + y[B:].flip(-1) if flip else y
        if total is None:
            total = y
        else:
            total = torch.maximum(total, y) if reduce == "max" else total + y
    if total is None:
        raise ValueError("multi_scale_seg needs at least one scale")
    return total if reduce == "max" else total / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def predict_probs(method, images: torch.Tensor, ecfg) -> torch.Tensor:
    """Class probabilities (B, K, H, W) for normalised ``images`` (B, 3, H, W) under the eval protocol
    ``ecfg`` (scales, flip and their reduction, sliding windows, then the CRF backend ``ecfg.crf`` on the
    softmax)."""
    from wsss.cam.crf import apply_crf
    from wsss.data.transforms import denormalize

    logits = multi_scale_seg(method, images, tuple(ecfg.scales), ecfg.flip, ecfg.reduce, ecfg.window, ecfg.overlap)
    probs = torch.softmax(logits, 1)
    return apply_crf(ecfg.crf, probs, denormalize(images.float()) * 255.0)


def fit_max_side(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """``x`` (B, 3, H, W) downscaled (bilinear, antialiased) so its longer side is at most ``max_side``;
    unchanged when it already is or ``max_side`` is 0."""
    if max_side < 0:
        raise ValueError(f"max_side {max_side}: give a positive side in pixels (0: off)")
    H, W = x.shape[-2:]
    if not max_side or max(H, W) <= max_side:
        return x
    s = max_side / max(H, W)
    size = (max(1, round(H * s)), max(1, round(W * s)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def probs_at(method, x: torch.Tensor, ecfg, max_side: int = 0) -> torch.Tensor:
    """Class probabilities (B, K, H, W) float32 for normalised ``x`` (B, 3, H, W) under the eval protocol
    ``ecfg``, computed on ``x`` downscaled to ``max_side`` (0: as is) and upsampled back to (H, W)."""
    p = predict_probs(method, fit_max_side(x, max_side), ecfg).float()
    if p.shape[-2:] != x.shape[-2:]:
        p = F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return p


@torch.no_grad()
def cams_at(method, x: torch.Tensor, max_side: int = 0) -> torch.Tensor:
    """CAMs (B, C, H, W) float32 in [0, 1] for normalised ``x`` (B, 3, H, W), computed as :func:`probs_at`."""
    c = method.predict_cams(fit_max_side(x, max_side)).float()
    if c.shape[-2:] != x.shape[-2:]:
        c = F.interpolate(c, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return c


def summarize_mask(mask: np.ndarray, classes: ClassSpec) -> tuple[tuple[str, ...], dict[str, float]]:
    """(found, shares) of an (H, W) index mask: foreground classes present by decreasing share, and every
    present class's pixel fraction."""
    counts = np.bincount(mask.ravel(), minlength=classes.K)[: classes.K]
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")
    names = classes.seg_names
    shares = {names[k]: float(counts[k]) / total for k in order if counts[k]}
    found = tuple(names[k] for k in order if counts[k] and k >= classes.fg_offset)
    return found, shares
