"""Side-by-side overlays for ``wsss predict --overlay``: the image, the image under its coloured mask, and a
legend of the classes present with their pixel shares."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from wsss.viz import colorize

SWATCH = 12  # legend row height in pixels (the default bitmap font is 11 px tall)


def blend(rgb: np.ndarray, mask: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image under (H, W) label indices coloured by ``palette``: ``(1 - alpha) rgb + alpha
    colour``, rounded; returns (H, W, 3) uint8."""
    col = colorize(torch.from_numpy(mask.astype(np.int64)), palette).permute(1, 2, 0).numpy().astype(np.float32)
    return np.round((1 - alpha) * rgb.astype(np.float32) + alpha * col).astype(np.uint8)


def overlay_panel(rgb: np.ndarray, mask: np.ndarray, shares: dict[str, float], names, palette) -> np.ndarray:
    """(H + legend, 2 W, 3) uint8: ``rgb`` (H, W, 3) beside its blend with ``mask`` (H, W), above a legend
    with one row per class of ``shares`` (name -> pixel fraction, in the order given): its palette colour,
    name and share in %. ``names`` are the mask's K class names (index order)."""
    H, W = mask.shape
    pal = np.asarray(list(palette)[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
    legend_h = SWATCH * len(shares) + 4
    out = Image.new("RGB", (2 * W, H + legend_h), (255, 255, 255))
    out.paste(Image.fromarray(rgb), (0, 0))
    out.paste(Image.fromarray(blend(rgb, mask, palette)), (W, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    index = {n: k for k, n in enumerate(names)}
    for row, (name, share) in enumerate(shares.items()):
        y = H + 2 + row * SWATCH
        draw.rectangle([2, y, 2 + SWATCH - 3, y + SWATCH - 3], fill=tuple(int(v) for v in pal[index[name]]),
                       outline=(0, 0, 0))  # fmt: skip
        draw.text((SWATCH + 4, y - 1), f"{name} {100 * share:.1f}%", fill=(0, 0, 0), font=font)
    return np.asarray(out)
