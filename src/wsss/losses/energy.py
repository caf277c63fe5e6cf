"""Dense-CRF energy regulariser on segmentation probabilities (Tang et al., "On regularized losses",
as ToCo uses it with weight 0.05).

``E = -(1/B) sum_i gate_i sum_k S_ik sum_j W_ij S_jk`` with a Gaussian bilateral kernel
``W_ij = exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2))`` over all pixel pairs; the
gate is 1 on unlabelled (ignored) pixels and ``1 - max_k S_ik`` elsewhere, 0 outside the image.
The official code evaluates the dense kernel with a C++ permutohedral lattice on images at half
size. Here it is computed exactly, in torch (CPU or GPU, no extension), on a grid of at most
``max_side`` pixels a side (the half-size image further downsampled when larger), and rescaled by
``(half-size pixels / grid pixels)^2`` so that its magnitude matches the half-size energy the
official ``1e-7`` inner weight was tuned for: an approximation at coarser resolution, labelled as
such. Like the official backward, the gradient is ``-2 gate * (W S) / B`` (the kernel is symmetric).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss.cam.crf import gaussian_kernel


def dense_energy_loss(
    probs: torch.Tensor,
    image: torch.Tensor,
    label: torch.Tensor,
    valid: torch.Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale: float = 0.5,
    max_side: int = 48,
    weight: float = 1e-7,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Energy loss.

    Args:
        probs: (B, K, H, W) softmax of the seg logits (at image size).
        image: (B, 3, H, W) RGB in 0..255.
        label: (B, H, W) pseudo labels; ``ignore_index`` marks the unlabelled pixels.
        valid: (B, H, W) bool, False on crop padding.
        sigma_rgb, sigma_xy: kernel widths in 0..255 colour units and full-size pixels.
        scale: the official working scale (0.5).
        max_side: largest grid side actually computed.
        weight: inner weight (the official 1e-7).
    """
    B, K, H, W = probs.shape
    h0, w0 = max(1, round(H * scale)), max(1, round(W * scale))
    r = min(1.0, max_side / max(h0, w0))
    h, w = max(1, round(h0 * r)), max(1, round(w0 * r))
    size = (h, w)
    S = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    img = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    roi = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0]
    unl = F.interpolate((label == ignore_index)[:, None].float(), size=size, mode="nearest")[:, 0] > 0
    S = S * roi[:, None]
    gate = (roi - S.amax(1)).clamp(min=0)
    gate = torch.where(unl, torch.ones_like(gate), gate).clamp(min=0) * roi
    # Positions in full-size pixel units so that sigma_xy keeps its meaning.
    ys = (torch.arange(h, device=probs.device, dtype=probs.dtype) + 0.5) * (H / h)
    xs = (torch.arange(w, device=probs.device, dtype=probs.dtype) + 0.5) * (W / w)
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).view(1, h * w, 2) / sigma_xy
    col = img.flatten(2).transpose(1, 2) / sigma_rgb  # (B, N, 3)
    feat = torch.cat([pos.expand(B, -1, -1), col], -1)
    kernel = gaussian_kernel(feat, feat)  # (B, N, N): the largest tensor of the loss
    s = S.flatten(2)  # (B, K, N)
    ws = torch.bmm(s, kernel)  # (B, K, N) = W S per class (kernel symmetric)
    gated = (ws * gate.flatten(1)[:, None]).detach()
    rescale = ((h0 * w0) / (h * w)) ** 2
    energy = -(s.detach() * gated).sum() / B
    # value: the energy; gradient: -2 * gated / B, as in the official backward
    surrogate = -2.0 * (s * gated).sum() / B
    return weight * rescale * (energy + surrogate - surrogate.detach())
