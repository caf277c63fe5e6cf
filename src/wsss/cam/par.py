"""Pixel-adaptive refinement (PAR): propagate maps along image-colour affinities.

Affinities over an 8-neighbour stencil at several dilations (48 neighbours for dilations
1, 2, 4, 8, 12, 24). For pixel i and neighbour j, the colour term is
``-(|I_i - I_j| / (std_j(I) + 1e-8) / w1)^2`` averaged over channels (std over the neighbours),
soft-maxed over neighbours; the position term is the same form on the neighbour distances
(d or d*sqrt(2)), soft-maxed and weighted by ``w2``. Each iteration replaces a map by the
affinity-weighted sum of its neighbours. Batched; neighbours are gathered by slicing a
replicate-padded tensor, no per-pixel loops; propagation accumulates one neighbour at a time, so
memory stays at a few copies of the maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_DIRS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int, float]]:
    """(dy, dx, distance) of each of the 8 * len(dilations) neighbours, in a fixed order."""
    return [(dy * d, dx * d, d * (math.sqrt(2) if dy and dx else 1.0)) for d in dilations for dy, dx in _DIRS]


def _neighbors(x: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, N, H, W): the value at each of the N = 8 * len(dilations) neighbours."""
    p = max(dilations)
    H, W = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    views = [xp[..., p + oy : p + oy + H, p + ox : p + ox + W] for oy, ox, _ in _offsets(dilations)]
    return torch.stack(views, dim=2)


def _position_affinity(dilations: tuple[int, ...], w1: float, device, dtype) -> torch.Tensor:
    dist = torch.tensor([r for _, _, r in _offsets(dilations)], device=device, dtype=dtype)
    return torch.softmax(-((dist / (dist.std() + 1e-8) / w1) ** 2), dim=0)


def par_affinity(
    image: torch.Tensor, dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24), w1: float = 0.3, w2: float = 0.01
) -> torch.Tensor:
    """Affinities (B, N, H, W) of each pixel to its N neighbours, from an image (B, 3, H, W)."""
    nb = _neighbors(image, dilations)  # (B, 3, N, H, W)
    std = nb.std(dim=2, keepdim=True)
    # In place on the neighbour stack: the (B, 3, N, H, W) temporaries' fresh pages cost more than the math.
    diff = nb.sub_(image.unsqueeze(2)).abs_()
    aff = diff.div_(std + 1e-8).div_(w1).square_().neg_().mean(dim=1)  # (B, N, H, W)
    pos = _position_affinity(dilations, w1, image.device, image.dtype)
    return torch.softmax(aff, dim=1) + w2 * pos.view(1, -1, 1, 1)


def par_refine(
    image: torch.Tensor,
    maps: torch.Tensor,
    iters: int = 10,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    w1: float = 0.3,
    w2: float = 0.01,
) -> torch.Tensor:
    """Refine ``maps`` (B, C, H, W) with PAR on ``image`` (B, 3, H, W) (maps resized to the image)."""
    if maps.shape[-2:] != image.shape[-2:]:
        maps = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=False)
    aff = par_affinity(image, dilations, w1, w2).unsqueeze(2)  # (B, N, 1, H, W)
    p = max(dilations)
    H, W = maps.shape[-2:]
    offsets = _offsets(dilations)
    for _ in range(iters):
        # Accumulate neighbour by neighbour: never materialises the (B, C, N, H, W) stack.
        mp = F.pad(maps, (p, p, p, p), mode="replicate")
        out = torch.zeros_like(maps)
        for n, (oy, ox, _) in enumerate(offsets):
            out.addcmul_(mp[..., p + oy : p + oy + H, p + ox : p + ox + W], aff[:, n])
        maps = out
    return maps
