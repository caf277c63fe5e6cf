"""Multi-scale + flip inference of segmentation logits, whole-image or in sliding windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss.cam.cam import rescale

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
    total, count = None, images.new_zeros((1, 1, H, W), dtype=torch.float32)
    for i in range(0, len(pos), WINDOW_CHUNK):
        chunk = pos[i : i + WINDOW_CHUNK]
        crops = torch.cat([images[..., y : y + wh, x : x + ww] for y, x in chunk])  # (len(chunk) * B, 3, wh, ww)
        out = method.predict_seg(crops).float()
        if total is None:
            total = out.new_zeros((B, out.shape[1], H, W))
        for j, (y, x) in enumerate(chunk):
            total[..., y : y + wh, x : x + ww] += out[j * B : (j + 1) * B]
            count[..., y : y + wh, x : x + ww] += 1
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
    total = None
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
