"""Multi-scale + flip inference of segmentation logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def multi_scale_seg(
    method, images: torch.Tensor, scales: tuple[float, ...] = (1.0,), flip: bool = False, reduce: str = "mean"
) -> torch.Tensor:
    """Seg logits (B, K, H, W) over ``scales`` (each resized back to the input size). ``reduce`` mean: the
    mean over scales and flips. ``max``: ToCo's test protocol (``tools/infer_seg_voc.py``), per scale the
    sum of the image's and its flip's logits, then the elementwise maximum over scales."""
    B, _, H, W = images.shape
    total = None
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        y = F.interpolate(method.predict_seg(x).float(), size=(H, W), mode="bilinear", align_corners=False)
        y = y[:B] + y[B:].flip(-1) if flip else y
        if total is None:
            total = y
        else:
            total = torch.maximum(total, y) if reduce == "max" else total + y
    return total if reduce == "max" else total / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def predict_probs(method, images: torch.Tensor, ecfg) -> torch.Tensor:
    """Class probabilities (B, K, H, W) for normalised ``images`` (B, 3, H, W) under the eval protocol
    ``ecfg`` (scales, flip and their reduction, then the CRF backend ``ecfg.crf`` on the softmax)."""
    from wsss.cam.crf import apply_crf
    from wsss.data.transforms import denormalize

    probs = torch.softmax(multi_scale_seg(method, images, tuple(ecfg.scales), ecfg.flip, ecfg.reduce), 1)
    return apply_crf(ecfg.crf, probs, denormalize(images.float()) * 255.0)
