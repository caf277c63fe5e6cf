"""Dense CRF post-processing of class probabilities (Krähenbühl & Koltun's fully connected CRF).

Two backends, looked up by name in the ``CRF`` registry:

- ``dense``: the reference implementation (``pydensecrf2``, the ``[crf]`` extra; permutohedral
  lattice, CPU, one image at a time). This is what the papers' final VOC/COCO figures use.
- ``torch``: the same mean-field CRF in plain torch (CPU or GPU, batched, no extension), with both
  Gaussian kernels filtered on our permutohedral lattice (:mod:`wsss.cam.permutohedral`), features in
  the reference's order (x, y, r, g, b). It gives the reference's label on every pixel of
  ``tests/unit/test_crf.py``'s case (mean |difference| of the probabilities 1.5e-7) and of four demo
  images (3e-8).

Both use a Potts compatibility and symmetrically normalised kernels (the reference's default), so one
mean-field update is ``Q <- softmax(log P + w_pos * m_pos + w_bi * m_bi)`` with
``m_i = n_i sum_j k_ij n_j Q_j`` and ``n_i = (sum_j k_ij)^(-1/2)``, the sums being the lattice's
(which, like the reference's, keeps the pixel's own contribution). Defaults follow the
official ToCo/FSR inference (10 iterations; positional sxy 1, weight 1; bilateral sxy 121, srgb 5,
weight 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wsss.cam.permutohedral import Lattice, pixel_features
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


@CRF.register("torch")
def torch_crf(probs: torch.Tensor, image: torch.Tensor, p: CRFParams) -> torch.Tensor:
    """Mean-field dense CRF on the permutohedral lattice (see the module docstring):
    (B, K, H, W) probabilities, (B, 3, H, W) RGB 0..255 -> (B, K, H, W)."""
    B, K, H, W = probs.shape
    probs, image = probs.detach().float(), image.detach().float()
    # The lattices depend on the image only: built once, used by every iteration.
    feats = (pixel_features(image, p.pos_xy), pixel_features(image, p.bi_xy, p.bi_rgb))
    kernels = [(w, Lattice(f)) for w, f in zip((p.w_pos, p.w_bi), feats)]

    def filt(lat: Lattice, v: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> lattice sum, same shape
        return lat.filter(v.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(v.shape)

    # Symmetric normalisation, as the reference implementation does by default: n = (sum_j k_ij)^(-1/2).
    ones = probs.new_ones(B, 1, H, W)
    norms = [filt(f, ones).clamp(min=1e-20).rsqrt() for _, f in kernels]
    unary = probs.clamp(min=1e-8).log()
    q = probs
    for _ in range(p.iters):
        msg = unary
        for (w, f), n in zip(kernels, norms):
            msg = msg + w * n * filt(f, n * q)
        q = torch.softmax(msg, 1)
    return q
