"""Multi-scale + flip inference of segmentation logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def multi_scale_seg(
    method, images: torch.Tensor, scales: tuple[float, ...] = (1.0,), flip: bool = False
) -> torch.Tensor:
    """Mean over scales (and flips) of seg logits (B, K, H, W), each resized back to the input size."""
    B, _, H, W = images.shape
    total = None
    n = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        y = F.interpolate(method.predict_seg(x).float(), size=(H, W), mode="bilinear", align_corners=False)
        y = y[:B] + y[B:].flip(-1) if flip else y
        total = y if total is None else total + y
        n += 2 if flip else 1
    return total / n


@torch.no_grad()
def predict_probs(method, images: torch.Tensor, ecfg) -> torch.Tensor:
    """Class probabilities (B, K, H, W) for normalised ``images`` (B, 3, H, W) under the eval protocol
    ``ecfg`` (scales, flip, then the CRF backend ``ecfg.crf`` on the softmax)."""
    from wsss.cam.crf import apply_crf
    from wsss.data.transforms import denormalize

    probs = torch.softmax(multi_scale_seg(method, images, tuple(ecfg.scales), ecfg.flip), 1)
    return apply_crf(ecfg.crf, probs, denormalize(images.float()) * 255.0)
