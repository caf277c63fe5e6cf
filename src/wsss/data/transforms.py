"""Training and evaluation transforms on (image, mask) pairs.

Randomness comes from a per-sample ``numpy.random.Generator`` seeded by the sampler, so a sample's
augmentation depends only on (run seed, position in the data stream): identical across worker counts,
processes and resumed runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wsss.data.classes import IGNORE_INDEX

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) floats in [0, 1] -> ImageNet-normalised."""
    m = torch.tensor(MEAN, device=img.device).view(-1, 1, 1)
    s = torch.tensor(STD, device=img.device).view(-1, 1, 1)
    return (img - m) / s


def denormalize(img: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: (B, 3, H, W) -> floats in [0, 1]."""
    m = torch.tensor(MEAN, device=img.device, dtype=img.dtype).view(1, -1, 1, 1)
    s = torch.tensor(STD, device=img.device, dtype=img.dtype).view(1, -1, 1, 1)
    return img * s + m


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1).div_(255.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of RGB in [0, 1], repeated on 3 channels: (..., 3, H, W) -> (..., 3, H, W)."""
    y = 0.299 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :]
    return y.expand_as(x)


def adjust_colour(rgb: torch.Tensor, brightness, contrast, saturation) -> torch.Tensor:
    """RGB (..., 3, H, W) in [0, 1] with brightness, contrast (about each image's mean) and saturation (about
    its grey) scaled by the factors (floats, or tensors broadcastable to (..., 1, 1, 1)), clamped to [0, 1].
    The loader's colour jitter and the on-device second view (:mod:`wsss.data.views`) both use it."""
    x = rgb * brightness
    mean = x.mean((-3, -2, -1), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = grayscale(x)
    return ((x - gray) * saturation + gray).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image of x (B, C, H, W) with its own ``sigma`` (B,) in pixels
    (reflect padding, kernel radius ceil(3 sigma_max), one grouped conv per axis, no loop)."""
    B, C, H, W = x.shape
    r = max(1, min(int(np.ceil(3 * float(sigma.max()))), (min(H, W) - 1)))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x.dtype).clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, 2r+1)
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


@dataclass(frozen=True)
class TrainTransform:
    """Random rescale, random crop with padding (mask 255, valid 0), flip, colour jitter, then (each
    with its probability) greyscale and a Gaussian blur of radius uniform in ``blur_sigma`` pixels
    (ToCo's training view: grey 0.2, blur 1.0 with DINO's radius 0.1-2; both 0: neither is drawn).

    Returns image (3, S, S) normalised, mask (S, S) long or None, valid (S, S) bool.
    """

    crop_size: int
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    color_jitter: float = 0.3
    p_gray: float = 0.0
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __call__(self, img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
        x = to_tensor(img)
        m = torch.from_numpy(mask.astype(np.int64)) if mask is not None else None
        h, w = x.shape[1:]
        s = float(rng.uniform(*self.scale_range))
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=s < 1)[0]
        if m is not None:
            m = F.interpolate(m[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        if self.hflip and rng.random() < 0.5:
            x = x.flip(-1)
            m = m.flip(-1) if m is not None else None
        if self.color_jitter > 0:
            x = _jitter(x, self.color_jitter, rng)
        # Drawn only when switched on, so recipes without them keep their random stream.
        if self.p_gray > 0 and rng.random() < self.p_gray:
            x = grayscale(x).contiguous()
        if self.p_blur > 0 and rng.random() < self.p_blur:
            x = gaussian_blur(x[None], torch.tensor([float(rng.uniform(*self.blur_sigma))]))[0]
        x = normalize(x)
        S = self.crop_size
        # Pad to at least S, then crop; padding is 0 after normalisation (the mean colour).
        ph, pw = max(S, nh), max(S, nw)
        oy, ox = int(rng.integers(0, ph - nh + 1)), int(rng.integers(0, pw - nw + 1))
        canvas = torch.zeros(3, ph, pw)
        canvas[:, oy : oy + nh, ox : ox + nw] = x
        valid = torch.zeros(ph, pw, dtype=torch.bool)
        valid[oy : oy + nh, ox : ox + nw] = True
        mcanvas = None
        if m is not None:
            mcanvas = torch.full((ph, pw), IGNORE_INDEX, dtype=torch.long)
            mcanvas[oy : oy + nh, ox : ox + nw] = m
        cy, cx = int(rng.integers(0, ph - S + 1)), int(rng.integers(0, pw - S + 1))
        sl = (slice(cy, cy + S), slice(cx, cx + S))
        return canvas[:, sl[0], sl[1]], (mcanvas[sl] if mcanvas is not None else None), valid[sl]


def _jitter(x: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    b, c, s = (1 + float(rng.uniform(-strength, strength)) for _ in range(3))
    return adjust_colour(x, b, c, s)


@dataclass(frozen=True)
class EvalTransform:
    """No geometry change; image normalised, mask as long, valid all True."""

    def __call__(self, img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator | None = None):
        x = normalize(to_tensor(img))
        m = torch.from_numpy(mask.astype(np.int64)) if mask is not None else None
        return x, m, torch.ones(x.shape[1:], dtype=torch.bool)
