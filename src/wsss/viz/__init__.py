"""Mask colouring, CAM overlays and image grids (numpy only; matplotlib is not needed here)."""

from __future__ import annotations

import numpy as np
import torch

from wsss.data.transforms import denormalize


def colorize(mask: torch.Tensor, palette: tuple[int, ...] | list[int]) -> torch.Tensor:
    """(H, W) label indices -> (3, H, W) uint8 colours of the palette (255 gets its palette entry)."""
    pal = torch.tensor(list(palette)[: 256 * 3], dtype=torch.uint8).view(-1, 3)
    return pal[mask.long().clamp(0, pal.shape[0] - 1)].permute(2, 0, 1)


def _heat(v: torch.Tensor) -> torch.Tensor:
    """(H, W) in [0, 1] -> (3, H, W) float blue-to-red heat colours."""
    v = v.clamp(0, 1)
    r = (1.5 - (4 * v - 3).abs()).clamp(0, 1)
    g = (1.5 - (4 * v - 2).abs()).clamp(0, 1)
    b = (1.5 - (4 * v - 1).abs()).clamp(0, 1)
    return torch.stack([r, g, b])


def cam_overlay(image: torch.Tensor, cam: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Normalised image (3, H, W) and a CAM (H, W) in [0, 1] -> (3, H, W) uint8 overlay."""
    rgb = denormalize(image[None].float())[0].clamp(0, 1)
    out = (1 - alpha) * rgb + alpha * _heat(cam.float().cpu())
    return (out * 255).round().to(torch.uint8)


def make_grid(rows: list[list[torch.Tensor]]) -> np.ndarray:
    """Rows of equally sized (3, H, W) uint8 tiles -> one (H_total, W_total, 3) uint8 array."""
    return np.concatenate([np.concatenate([t.permute(1, 2, 0).cpu().numpy() for t in r], 1) for r in rows], 0)
