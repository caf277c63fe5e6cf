"""Dense CRF post-processing of class probabilities (Krähenbühl & Koltun's fully connected CRF).

Two backends, looked up by name in the ``CRF`` registry:

- ``dense``: the reference implementation (``pydensecrf2``, the ``[crf]`` extra; permutohedral
  lattice, CPU, one image at a time). This is what the papers' final VOC/COCO figures use.
- ``torch``: an approximate mean-field CRF in plain torch (CPU or GPU, batched, no extension). The
  positional Gaussian kernel is applied exactly at full resolution with a separable convolution. The
  bilateral message reaches every full-size pixel (its own colour and position) but is summed over
  the pixels of a regular subgrid of at most ``max_side`` pixels a side instead of over all pixels,
  each weighted by the pixel count of its cell (a Monte-Carlo-like estimate of the full sum; real
  pixels, not averaged colours, because the colour kernel is narrow): an approximation, labelled as
  such. With ``max_side`` at least the image side it is the exact dense CRF (O(N^2)).

Both use a Potts compatibility and symmetrically normalised kernels (the reference's default), so one
mean-field update is ``Q <- softmax(log P + w_pos * m_pos + w_bi * m_bi)`` with
``m_i = n_i sum_{j != i} k_ij n_j Q_j`` and ``n_i = (sum_j k_ij)^(-1/2)``. Defaults follow the
official ToCo/FSR inference (10 iterations; positional sxy 1, weight 1; bilateral sxy 121, srgb 5,
weight 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wsss.registry import CRF


@dataclass(frozen=True)
class CRFParams:
    """Kernel widths in pixels (``*_xy``) and 0..255 colour units (``bi_rgb``); ``w_*``: Potts weights."""

    iters: int = 10
    pos_xy: float = 1.0
    w_pos: float = 1.0
    bi_xy: float = 121.0
    bi_rgb: float = 5.0
    w_bi: float = 4.0
    max_side: int = 64  # torch backend only: side of the pixel subgrid that sends bilateral messages
    cache_mb: int = 1024  # torch backend only: keep the bilateral kernel in memory up to this size


def apply_crf(name: str, probs: torch.Tensor, image: torch.Tensor, params: CRFParams | None = None) -> torch.Tensor:
    """Refine class probabilities with the CRF backend ``name`` ("none" returns ``probs``).

    Args:
        probs: (B, K, H, W) class probabilities (softmax of the seg logits).
        image: (B, 3, H, W) RGB in 0..255 (de-normalised), same size.
    Returns:
        (B, K, H, W) refined probabilities on ``probs``' device.
    """
    if name == "none":
        return probs
    return CRF.get(name)(probs, image, params or CRFParams())


@CRF.register("dense")
def dense_crf(probs: torch.Tensor, image: torch.Tensor, p: CRFParams) -> torch.Tensor:
    """pydensecrf2 backend: (B, K, H, W) probabilities, (B, 3, H, W) RGB 0..255 -> (B, K, H, W)."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:  # one clear line instead of a traceback deep in inference
        raise RuntimeError(
            "crf backend 'dense' needs pydensecrf2: pip install 'wsss[crf]' (or use --eval.crf torch)"
        ) from e
    B, K, H, W = probs.shape
    out = []
    for b in range(B):
        prob = probs[b].detach().float().cpu().numpy()
        rgb = np.ascontiguousarray(image[b].detach().round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy())
        d = dcrf.DenseCRF2D(W, H, K)
        d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(prob, 1e-8, 1.0)).reshape(K, -1)))
        d.addPairwiseGaussian(sxy=p.pos_xy, compat=p.w_pos)
        d.addPairwiseBilateral(sxy=p.bi_xy, srgb=p.bi_rgb, rgbim=rgb, compat=p.w_bi)
        q = np.array(d.inference(p.iters), dtype=np.float32).reshape(K, H, W)
        out.append(torch.from_numpy(q))
    return torch.stack(out).to(probs.device)


def _gauss_1d(sigma: float, device, dtype) -> torch.Tensor:
    r = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-r, r + 1, device=device, dtype=dtype)
    return torch.exp(-0.5 * (x / sigma) ** 2)


def _gauss_filter(q: torch.Tensor, sigma: float) -> torch.Tensor:
    """sum_j exp(-|p_i - p_j|^2 / 2 sigma^2) q_j over all j (self included), as a separable zero-padded conv."""
    B, K, H, W = q.shape
    g = _gauss_1d(sigma, q.device, q.dtype)
    r = g.numel() // 2
    x = F.conv2d(q.reshape(B * K, 1, H, W), g.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(x, g.view(1, 1, -1, 1), padding=(r, 0)).view(B, K, H, W)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``exp(-|a_i - b_j|^2 / 2)`` for feature sets a (B, N, F) and b (B, M, F) -> (B, N, M).

    Squared distances are capped at 80 (exp(-40) ~ 4e-18): the exp then never produces denormals,
    which are many times slower on CPUs.
    """
    d2 = (a.pow(2).sum(-1)[:, :, None] + b.pow(2).sum(-1)[:, None]).baddbmm_(a, b.transpose(1, 2), alpha=-2.0)
    return d2.clamp_(0, 80).mul_(-0.5).exp_()


def bilateral_kernel(image: torch.Tensor, size: tuple[int, int], sxy: float, srgb: float) -> torch.Tensor:
    """Dense bilateral kernel among the pixels of a ``size`` subgrid of ``image`` (B, 3, H, W) -> (B, n, n)."""
    f = _features(image, size, sxy, srgb)[0]
    return gaussian_kernel(f, f)


def _features(image: torch.Tensor, size: tuple[int, int], sxy: float, srgb: float):
    """(B, h*w, 5) bilateral features (position / sxy, colour / srgb) of the pixels of a ``size`` grid of
    ``image`` (B, 3, H, W): real pixels (no averaged colours), positions in full-size pixels, and the
    pixels' row and column indices."""
    B, _, H, W = image.shape
    h, w = size
    ys = ((torch.arange(h, device=image.device) + 0.5) * (H / h)).long().clamp(max=H - 1)
    xs = ((torch.arange(w, device=image.device) + 0.5) * (W / w)).long().clamp(max=W - 1)
    img = image[:, :, ys][:, :, :, xs]
    yy, xx = torch.meshgrid(ys.to(image.dtype) + 0.5, xs.to(image.dtype) + 0.5, indexing="ij")
    pos = torch.stack([yy, xx], -1).view(1, h * w, 2) / sxy
    return torch.cat([pos.expand(B, -1, -1), img.flatten(2).transpose(1, 2) / srgb], -1), ys, xs


@CRF.register("torch")
def torch_crf(probs: torch.Tensor, image: torch.Tensor, p: CRFParams, chunk: int = 4096) -> torch.Tensor:
    """Approximate mean-field CRF (see the module docstring): (B, K, H, W), (B, 3, H, W) -> (B, K, H, W).

    The bilateral message of every full-size pixel is summed over the pixels of a regular subgrid of
    at most ``max_side`` a side (each standing for the pixels of its cell), so the receiving pixel
    keeps its own colour and position. The kernel is kept when it fits ``cache_mb``, else rebuilt
    ``chunk`` receivers at a time each iteration, so memory stays at ``chunk x max_side^2``.
    """
    B, K, H, W = probs.shape
    probs, image = probs.detach().float(), image.detach().float()
    r = min(1.0, p.max_side / max(H, W))
    h, w = max(1, round(H * r)), max(1, round(W * r))
    keys, ky, kx = _features(image, (h, w), p.bi_xy, p.bi_rgb)  # (B, n, 5)
    queries, _, _ = _features(image, (H, W), p.bi_xy, p.bi_rgb)  # (B, N, 5)
    area = (H * W) / (h * w)

    def kernel(s: int) -> torch.Tensor:  # (B, chunk, n) kernel rows of receivers s .. s + chunk
        return gaussian_kernel(queries[:, s : s + chunk], keys)

    starts = range(0, H * W, chunk)
    # Rebuilding the kernel dominates the cost: keep it when it fits the budget (small images, GPUs).
    cached = [kernel(s) for s in starts] if B * H * W * h * w * 4 <= p.cache_mb * 2**20 else None

    def bilateral(v: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> sum over the subgrid, at every pixel
        vc = v[:, :, ky][:, :, :, kx].flatten(2).transpose(1, 2)  # (B, n, C) at the subgrid pixels
        out = [torch.bmm(cached[i] if cached else kernel(s), vc) for i, s in enumerate(starts)]
        return (torch.cat(out, 1) * area).transpose(1, 2).reshape(B, v.shape[1], H, W)

    # Symmetric normalisation, as the reference implementation does by default:
    # message_i = n_i sum_{j != i} k_ij n_j Q_j with n = (sum_j k_ij)^(-1/2).
    ones = probs.new_ones(B, 1, H, W)
    n_bi = bilateral(ones).clamp(min=1e-20).rsqrt()
    n_pos = _gauss_filter(ones, p.pos_xy).clamp(min=1e-20).rsqrt()
    unary = probs.clamp(min=1e-8).log()
    q = probs
    for _ in range(p.iters):
        bi = n_bi * bilateral(n_bi * q) - n_bi.pow(2) * q  # minus the pixel itself (kernel value 1)
        pos = n_pos * _gauss_filter(n_pos * q, p.pos_xy) - n_pos.pow(2) * q
        q = torch.softmax(unary + p.w_pos * pos + p.w_bi * bi, 1)
    return q
