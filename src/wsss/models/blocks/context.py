"""WS-FCN's two blocks: flexible context aggregation and semantically consistent bottom-up fusion."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ContextAggregation(nn.Module):
    """Global context at several granularities, fused back into the map through a residual gate.

    For each grid size g in ``grids`` the map is average-pooled to g x g cells, reduced (1x1 conv),
    aggregated across adjacent cells (3x3 conv on the pooled grid: each cell also sees its neighbours),
    reweighted per channel (squeeze-excitation from the branch's own mean) and upsampled back. The
    branches are concatenated, fused by a 1x1 conv, weighted by a spatial attention map (3x3 conv over
    the channel mean and max, sigmoid; as WS-FCN's FCA) and added: ``y = x + gate * ctx``. A grid of 1
    is global average pooling, so every output cell depends on every input cell.

    Args:
        dim: channels D of the map.
        grids: pooled grid sizes (granularities).
        hidden: channels per branch.
        gate_init: start of the per-channel gate (0: identity at start).
    """

    def __init__(self, dim: int, grids: tuple[int, ...], hidden: int, gate_init: float = 0.0) -> None:
        super().__init__()
        self.grids = tuple(grids)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU())
            for _ in self.grids
        )
        self.se = nn.ModuleList(nn.Linear(hidden, hidden) for _ in self.grids)
        self.fuse = nn.Conv2d(hidden * len(self.grids), dim, 1)
        self.spatial = nn.Conv2d(2, 1, 3, padding=1)
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, h, w)."""
        h, w = x.shape[-2:]
        outs = []
        for g, branch, se in zip(self.grids, self.branches, self.se):
            b = branch(F.adaptive_avg_pool2d(x, (min(g, h), min(g, w))))
            b = b * torch.sigmoid(se(b.mean((2, 3))))[:, :, None, None]
            outs.append(F.interpolate(b, size=(h, w), mode="bilinear", align_corners=False))
        ctx = self.fuse(torch.cat(outs, 1))
        ctx = ctx * torch.sigmoid(self.spatial(torch.cat([ctx.mean(1, keepdim=True), ctx.amax(1, keepdim=True)], 1)))
        return x + self.gate.to(x.dtype)[:, None, None] * ctx


class SemanticFusion(nn.Module):
    """Bottom-up fusion of low-level maps into the high-level one, gated by the high-level semantics.

    Each low-level map (any width, same or finer grid) is normalised (GroupNorm, one group: ViT
    residual-stream tokens and CNN stages differ wildly in scale), projected (3x3 conv, ReLU, 1x1 conv to
    D) and average-pooled to the high-level grid. A semantic gate ``s = sigmoid(conv1x1(high))`` decides
    per position and channel how much detail may enter, so detail is admitted where the high-level
    features call for it rather than everywhere (background clutter): ``y = high + a * s * sum_l low_l``
    with a per-channel learnable ``a`` (init ``gate_init`` 0: y == high exactly).

    Args:
        low_dims: channels of each low-level map.
        dim: channels D of the high-level map.
        hidden: projection width.
        gate_init: start of ``a``.
    """

    def __init__(self, low_dims: list[int], dim: int, hidden: int, gate_init: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(1, d), nn.Conv2d(d, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, dim, 1))
            for d in low_dims
        )
        self.sem = nn.Conv2d(dim, dim, 1)
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init)))

    def forward(self, high: torch.Tensor, lows: list[torch.Tensor]) -> torch.Tensor:
        """high (B, D, h, w), lows [(B, D_l, h_l, w_l)] with h_l >= h -> (B, D, h, w)."""
        size = high.shape[-2:]
        detail = 0
        for low, proj in zip(lows, self.proj):
            d = proj(low.to(high.dtype))
            detail = detail + (d if d.shape[-2:] == size else F.adaptive_avg_pool2d(d, size))
        return high + self.gate.to(high.dtype)[:, None, None] * torch.sigmoid(self.sem(high)) * detail


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each position of a map (B, C, H, W): no batch statistics (WSSS
    micro-batches are 2-4 crops) and no coupling between positions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_norm_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), ChannelNorm(cout), nn.ReLU())


def warp(high: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample the coarse map ``high`` (B, D, h, w) at the centres of a finer grid (H, W) moved by ``flow``
    (B, 2, H, W) (x, y offsets in fine-grid cells): (B, D, H, W). A zero flow is bilinear upsampling."""
    B, _, H, W = flow.shape
    ys = (torch.arange(H, device=flow.device, dtype=flow.dtype) + 0.5) * 2 / H - 1
    xs = (torch.arange(W, device=flow.device, dtype=flow.dtype) + 0.5) * 2 / W - 1
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (H, W, 2) as (x, y)
    scale = torch.tensor([2 / W, 2 / H], device=flow.device, dtype=flow.dtype)
    grid = base[None] + flow.permute(0, 2, 3, 1) * scale
    return F.grid_sample(high, grid.to(high.dtype), mode="bilinear", padding_mode="border", align_corners=False)


class FlowAlignedFusion(nn.Module):
    """WS-FCN's semantically consistent fusion at the low-level map's resolution.

    The high-level map is aligned to the low-level grid by a learned flow: both are reduced (1x1 conv
    to ``hidden``), a 3x3 conv over their concatenation predicts a 2-channel offset field (zero at
    initialisation: plain bilinear upsampling), and the high-level map is sampled there. Two branches
    (3x3 conv, per-position channel norm, ReLU) on the low-level map and on the aligned high-level map
    are multiplied elementwise, the high-level semantics gating the low-level detail; each branch adds
    the product back (``l + l * h`` and ``h + l * h``), and a 1x1 conv maps their concatenation to D.
    The result lives on the low-level grid.

    Args:
        low_dim: channels of the low-level map.
        dim: channels D of the high-level map (and of the output).
        hidden: branch width.
    """

    def __init__(self, low_dim: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.low_in, self.high_in = nn.Conv2d(low_dim, hidden, 1), nn.Conv2d(dim, hidden, 1)
        self.flow = nn.Conv2d(2 * hidden, 2, 3, padding=1)
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)
        self.low_branch, self.high_branch = _conv_norm_relu(low_dim, hidden), _conv_norm_relu(dim, hidden)
        self.out = nn.Conv2d(2 * hidden, dim, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """high (B, D, h, w), low (B, D_l, H, W) with H >= h -> fused (B, D, H, W)."""
        low = low.to(high.dtype)
        size = low.shape[-2:]
        high_r = F.interpolate(self.high_in(high), size=size, mode="bilinear", align_corners=False)
        flow = self.flow(torch.cat([self.low_in(low), high_r], 1))
        aligned = warp(high, flow)
        lo, hi = self.low_branch(low), self.high_branch(aligned)
        prod = lo * hi
        return self.out(torch.cat([lo + prod, hi + prod], 1))
