"""Dense-CRF energy regulariser on segmentation probabilities (Tang et al., "On regularized losses",
as ToCo uses it with weight 0.05).

``E = -(1/B) sum_i gate_i sum_k S_ik sum_j W_ij S_jk`` with a Gaussian bilateral kernel
``W_ij = exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2))`` over all pixel pairs; the
gate is 1 on unlabelled (ignored) pixels and ``1 - max_k S_ik`` elsewhere, 0 outside the image.
As in the official code, everything is taken at ``scale`` (half size: probabilities bilinear, image,
labels and valid mask nearest) and ``W S`` is filtered on the permutohedral lattice
(:func:`wsss.cam.permutohedral.permutohedral_filter`, plain torch), in O(pixels) instead of O(pixels^2).
The lattice's output is scaled to estimate the exact Gaussian sum; like any permutohedral filter it
runs below it where colours cluster (0.82 of it on image features, measured), which the official C++
lattice shares up to its own constant. Like the official backward, the gradient is
``-2 gate * (W S) / B`` (the kernel is symmetric).

The official constants (inner weight 1e-7, ``sigma_xy`` 100 px) are set for 448 px crops, and the
term does not keep its strength at other sizes: a pixel's energy gradient grows with the kernel mass
around it (the pixels within ``sigma_xy``) while its seg-CE gradient shrinks as 1 / pixels. At a
112 px crop the regulariser is about 250x weaker against the CE than at 448 (its value on the demo
recipe: -0.02, its seg CE 0.3-2), so the unlabelled band it is meant to fill is left to the seg
head's guess. With ``ref_side`` (the crop side the constants are for) both are rescaled to the
actual side s: ``sigma_xy * s / ref_side`` (the same share of the crop) and ``weight * (ref_side / s)^4``,
which keeps the energy-to-CE gradient ratio of the official 448 px setting at any crop size; at
``ref_side`` itself, or with ``ref_side = 0``, the constants are the official ones. Measured on the
112 px demo recipe (3 seeds, ``toco``): the official strength lowered seg mIoU on every seed (27.50 ±
1.16 -> 23.98 ± 1.82, paired -3.51 ± 1.27), so ``toco`` keeps the constants as given by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss.cam.permutohedral import permutohedral_filter, pixel_features


def dense_energy_loss(
    probs: torch.Tensor,
    image: torch.Tensor,
    label: torch.Tensor,
    valid: torch.Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale: float = 0.5,
    weight: float = 1e-7,
    ignore_index: int = 255,
    ref_side: float = 0.0,
) -> torch.Tensor:
    """Energy loss (a scalar).

    Args:
        probs: (B, K, H, W) softmax of the seg logits (at image size).
        image: (B, 3, H, W) RGB in 0..255.
        label: (B, H, W) pseudo labels; ``ignore_index`` marks the unlabelled pixels.
        valid: (B, H, W) bool, False on crop padding.
        sigma_rgb, sigma_xy: kernel widths in 0..255 colour units and full-size pixels.
        scale: working scale (the official 0.5).
        weight: inner weight (the official 1e-7).
        ref_side: crop side (px) ``sigma_xy`` and ``weight`` are given for; 0: use them as given.
    """
    B, K, H, W = probs.shape
    if ref_side > 0:
        k = (H * W) ** 0.5 / ref_side
        sigma_xy, weight = sigma_xy * k, weight / k**4
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    S = F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)
    img = F.interpolate(image.float(), size=size, mode="nearest")
    roi = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0]
    unl = F.interpolate((label == ignore_index)[:, None].float(), size=size, mode="nearest")[:, 0] > 0
    S = S * roi[:, None]
    s = S.flatten(2)  # (B, K, N)
    with torch.no_grad():
        gate = (roi - S.amax(1)).clamp(min=0)
        gate = torch.where(unl, torch.ones_like(gate), gate).clamp(min=0) * roi
        # Positions in pixels of the working scale with sxy scaled alike, as the official code does.
        feat = pixel_features(img, sigma_xy * scale, sigma_rgb)  # (B, N, 5)
        ws = permutohedral_filter(feat, s.detach().transpose(1, 2)).transpose(1, 2)  # (B, K, N) = W S
        gated = ws * gate.flatten(1)[:, None]
    energy = -(s.detach() * gated).sum() / B
    # value: the energy; gradient: -2 * gated / B, as in the official backward
    surrogate = -2.0 * (s * gated).sum() / B
    return weight * (energy + surrogate - surrogate.detach())
