"""Multi-scale, flipped class activation maps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def rescale(images: torch.Tensor, s: float) -> torch.Tensor:
    """(B, C, H, W) resized by the factor ``s`` (bilinear), each side at least 1 pixel: an image smaller than
    1 / s pixels would otherwise get a side of 0 (the resize of every other image is unchanged)."""
    if s == 1.0:
        return images
    h, w = images.shape[-2:]
    if math.floor(h * s) >= 1 and math.floor(w * s) >= 1:
        return F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
    size = (max(1, math.floor(h * s)), max(1, math.floor(w * s)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def minmax_normalize(cam: torch.Tensor, eps: float = 1e-5, inplace: bool = False) -> torch.Tensor:
    """Per-map min-max normalisation of (B, C, H, W) to [0, 1) (``inplace``: overwrites ``cam``)."""
    lo = cam.amin(dim=(2, 3), keepdim=True)
    cam = cam.sub_(lo) if inplace else cam - lo
    return cam.div_(cam.amax(dim=(2, 3), keepdim=True) + eps)


@torch.no_grad()
def multi_scale_cam(
    cam_fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    images: torch.Tensor,
    scales: tuple[float, ...] = (1.0, 0.5, 1.5),
    flip: bool = True,
    base: dict[float, tuple[torch.Tensor, ...]] | None = None,
    base_flip: dict[float, tuple[torch.Tensor, ...]] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Sum over scales of max(CAM, flipped-back CAM of the flipped image), min-max normalised.

    Args:
        cam_fn: images (N, 3, h, w) -> tuple of raw CAMs (N, C, h', w') (e.g. final and auxiliary).
        images: (B, 3, H, W).
        scales: input rescale factors.
        flip: also run the horizontally flipped image (batched with the original: one pass per scale).
        base: {scale: raw CAMs of the unflipped images at that scale} that the caller already has
            (e.g. from a training forward; detached here); those passes are not run again.
        base_flip: the same for the flipped images (CAMs of the flipped image, not flipped back).

    Returns:
        One (B, C, H, W) map in [0, 1] per output of ``cam_fn``.
    """
    B, _, H, W = images.shape
    base, base_flip = base or {}, base_flip or {}
    sums: list[torch.Tensor] | None = None
    for s in scales:
        x = rescale(images, s)
        todo = ([] if s in base else [x]) + ([x.flip(-1)] if flip and s not in base_flip else [])
        ran = cam_fn(torch.cat(todo, 0)) if todo else None
        outs = []
        for k in range(len(ran) if ran is not None else len(base.get(s) or base_flip[s])):
            got = list(torch.split(ran[k], B)) if ran is not None else []
            parts = [base[s][k] if s in base else got.pop(0)]
            if flip:
                parts.append(base_flip[s][k] if s in base_flip else got.pop(0))
            outs.append(torch.cat(parts, 0))
        # In place where the tensors are ours: these full-size (B, C, H, W) maps are the big temporaries here.
        maps = []
        for cam in outs:
            up = F.interpolate(cam.detach().float(), size=(H, W), mode="bilinear", align_corners=False)
            m = up[:B]
            if flip:
                torch.maximum(m, up[B:].flip(-1), out=m)
            maps.append(m.relu_())
        sums = maps if sums is None else [a.add_(b) for a, b in zip(sums, maps)]
    assert sums is not None
    return tuple(minmax_normalize(m, inplace=True) for m in sums)
