"""Multi-scale, flipped class activation maps."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def minmax_normalize(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-map min-max normalisation of (B, C, H, W) to [0, 1)."""
    lo = cam.amin(dim=(2, 3), keepdim=True)
    cam = cam - lo
    return cam / (cam.amax(dim=(2, 3), keepdim=True) + eps)


@torch.no_grad()
def multi_scale_cam(
    cam_fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    images: torch.Tensor,
    scales: tuple[float, ...] = (1.0, 0.5, 1.5),
    flip: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Sum over scales of max(CAM, flipped-back CAM of the flipped image), min-max normalised.

    Args:
        cam_fn: images (N, 3, h, w) -> tuple of raw CAMs (N, C, h', w') (e.g. final and auxiliary).
        images: (B, 3, H, W).
        scales: input rescale factors.
        flip: also run the horizontally flipped image (batched with the original: one pass per scale).

    Returns:
        One (B, C, H, W) map in [0, 1] per output of ``cam_fn``.
    """
    B, _, H, W = images.shape
    sums: list[torch.Tensor] | None = None
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        outs = cam_fn(x)
        maps = []
        for cam in outs:
            cam = F.interpolate(cam.float(), size=(H, W), mode="bilinear", align_corners=False)
            if flip:
                cam = torch.maximum(cam[:B], cam[B:].flip(-1))
            maps.append(torch.relu(cam))
        sums = maps if sums is None else [a + b for a, b in zip(sums, maps)]
    assert sums is not None
    return tuple(minmax_normalize(m) for m in sums)
