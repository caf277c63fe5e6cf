"""Class-token contrast (ToCo's CTC): local crops vs global views, with background crops as negatives.

Crops are centred on pixels that are background or uncertain in the auxiliary CAM; a crop whose
region is mostly confident background (mean ROI value <= ``neg_ratio``, ROI 0 = background,
1 = uncertain, 2 = foreground) is a negative, every other crop and both global views are positives.
For teacher view i (EMA projector on a detached global class token) and positive student output j:
``-log(e_ij / (e_ij + sum_neg e_ik + 1e-4))`` with ``e = exp(sim(t, s) / temp)``, plus one
``-log(1 / (1 + sum_neg e_ik + 1e-4))`` term per teacher view, normalised by 2 * (#positives) and
averaged over images: the official formula, computed in log space (no overflow) and without loops.
Crops are cut for the whole batch in one ``roi_align`` call.

``sim`` is the cosine similarity (``cosine=True``, our default) or, as the official code, the raw dot
product of the projector outputs. Those outputs are a weight-normalised linear map W (out_dim x
bottleneck, unit rows) of a unit vector, so t . s = z_t' W'W z_s: its scale is the spectrum of W'W,
out_dim / bottleneck = 4 at initialisation but free to grow to out_dim as the rows align. The loss
falls when that scale grows, so the optimizer grows it: on the demo recipe the top eigenvalue of W'W
went from 9 to 47 in 70 iterations, logits reached 48, per-step CTC spiked to 4-6 (32-41 were reported on a
160 px tagged dataset), and then every crop's output collapsed onto one point (equal similarity to
the teacher for positives and negatives: no contrast left). Cosine similarity fixes the scale at the
official's initial one when ``temp`` is the official 0.5 x bottleneck / out_dim = 0.125: the same loss
at initialisation, but it can only fall by separating crops, not by inflating the scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def roi_from_cam(cam: torch.Tensor, tags: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """(B, H, W) ROI map from CAMs (B, C, H, W): 0 background, 1 uncertain, 2 confident foreground."""
    v = (cam * tags[:, :, None, None]).amax(1)
    roi = torch.ones_like(v, dtype=torch.long)
    roi[v <= low] = 0
    roi[v >= high] = 2
    return roi


def sample_local_crops(
    images: torch.Tensor, roi: torch.Tensor, n: int, size: int, neg_ratio: float = 0.2, generator=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` crops per image centred on non-foreground pixels, their positive flags and centres.

    Args:
        images: (B, 3, H, W).
        roi: (B, H, W) from :func:`roi_from_cam`.
        n: crops per image.
        size: crop side in pixels (crops reaching past the border are zero-padded).

    Returns:
        crops (B * n, 3, size, size) ordered image-major, flags (B, n) bool (True = positive),
        centres (B, n, 2) long (y, x); crop k spans rows y - size//2 .. y + size - size//2 - 1.
    """
    B, _, H, W = images.shape
    weight = (roi <= 1).flatten(1).float()
    few = weight.sum(1, keepdim=True) < n
    weight = torch.where(few, torch.ones_like(weight), weight)  # nothing uncertain: crop anywhere
    idx = torch.multinomial(weight, n, replacement=False, generator=generator)  # (B, n)
    cy, cx = (idx // W).float(), (idx % W).float()
    half = size / 2
    boxes = torch.stack([cx - half, cy - half, cx + half, cy + half], -1)  # (B, n, 4) x1 y1 x2 y2
    bidx = torch.arange(B, device=images.device, dtype=images.dtype)[:, None, None].expand(B, n, 1)
    m = size // 2 + 1  # zero margin: roi_align would clamp (replicate) samples just outside the image
    rois = torch.cat([bidx, boxes.to(images.dtype) + m], -1).view(-1, 5)
    padded = torch.nn.functional.pad(images, (m, m, m, m))
    crops = roi_align(padded, rois, output_size=size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    # Mean ROI value inside each box from an integral image (out-of-image parts count as background).
    ii = torch.nn.functional.pad(roi.float().cumsum(1).cumsum(2), (1, 0, 1, 0))
    y0 = (cy - half).round().clamp(0, H).long()
    y1 = (cy + half).round().clamp(0, H).long()
    x0 = (cx - half).round().clamp(0, W).long()
    x1 = (cx + half).round().clamp(0, W).long()
    flat = ii.flatten(1)
    g = lambda y, x: torch.gather(flat, 1, y * (W + 1) + x)  # noqa: E731
    box_sum = g(y1, x1) - g(y0, x1) - g(y1, x0) + g(y0, x0)
    flags = box_sum / (size * size) > neg_ratio
    return crops, flags, torch.stack([idx // W, idx % W], -1)


def class_token_contrast(
    teacher: torch.Tensor, student: torch.Tensor, flags: torch.Tensor, temp: float = 0.125, cosine: bool = True
) -> torch.Tensor:
    """CTC loss.

    Args:
        teacher: (B, V, E) teacher outputs of the V global views.
        student: (B, S, E) student outputs: the V global views first, then the local crops.
        flags: (B, S) bool, True = positive (global views are always positive).
        temp: temperature.
        cosine: cosine similarities (scale-free); False: raw dot products, as the official code.
    """
    if cosine:
        teacher, student = F.normalize(teacher, dim=-1), F.normalize(student, dim=-1)
    s = torch.einsum("bve,bse->bvs", teacher, student) / temp  # (B, V, S) log e_ij
    neg = ~flags[:, None, :]
    log_negsum = torch.logsumexp(s.masked_fill(~neg, float("-inf")), dim=-1)  # (B, V); -inf if no negative
    log_eps = math.log(1e-4)
    # log(e_ij + N_i + eps) for every j; only positive j are used
    denom = torch.logsumexp(torch.stack([s, log_negsum[..., None].expand_as(s), torch.full_like(s, log_eps)]), 0)
    pos_terms = ((denom - s) * flags[:, None, :]).sum(-1)  # (B, V)
    zero = torch.zeros_like(log_negsum)
    base = torch.logsumexp(torch.stack([zero, log_negsum, zero + log_eps]), 0)  # -log(1 / (1 + N + eps))
    per_image = (pos_terms + base).sum(-1) / (teacher.shape[1] * (flags.sum(-1).float() + 1e-4))
    return per_image.mean()
