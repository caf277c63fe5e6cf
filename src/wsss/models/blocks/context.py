"""WS-FCN's blocks: flexible context aggregation (the official FCA operator and a pooled-grid variant) and
semantically consistent bottom-up fusion (flow-aligned on the low-level grid, and a pooled variant)."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F


class ContextAggregation(nn.Module):
    """Pooled-grid context (our variant of FCA): global context at several granularities, fused back into
    the map through a residual gate.

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


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each position of a map (B, C, H, W): no batch statistics (WSSS
    micro-batches are 2-4 crops) and no coupling between positions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def fca_dilations(stride: int, base: tuple[int, ...] = (1, 12, 24, 36)) -> tuple[int, ...]:
    """WS-FCN's FCA dilations for a feature map of ``stride``: ``base`` at stride 8 (the code's 1, 12, 24,
    36; 1, 6, 12, 18 at 16), scaled by 8 / stride and rounded, at least 1."""
    return tuple(max(1, round(d * 8 / stride)) for d in base)


class SeparableDilated(nn.Module):
    """One FCA branch: ``k x 1`` then ``1 x k`` plus ``1 x k`` then ``k x 1``, all at dilation ``d``, padded
    so that the grid is kept. Output cell (i, j) reads the input cells (i + a d, j + b d), |a|, |b| <= k // 2:
    a sparse k x k lattice, as wide as a (k - 1) d + 1 kernel at the cost of four 1-D ones.

    Args:
        cin, cout: channels in and out.
        k: odd kernel length.
        d: dilation.
    """

    def __init__(self, cin: int, cout: int, k: int, d: int) -> None:
        super().__init__()
        if k % 2 != 1:
            raise ValueError(f"FCA kernel sizes must be odd, got {k}")
        p = d * (k - 1) // 2
        self.col = nn.Sequential(
            nn.Conv2d(cin, cout, (k, 1), padding=(p, 0), dilation=d, bias=False),
            nn.Conv2d(cout, cout, (1, k), padding=(0, p), dilation=d, bias=False),
        )
        self.row = nn.Sequential(
            nn.Conv2d(cin, cout, (1, k), padding=(0, p), dilation=d, bias=False),
            nn.Conv2d(cout, cout, (k, 1), padding=(p, 0), dilation=d, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, h, w) -> (B, cout, h, w)."""
        return self.col(x) + self.row(x)


class ChannelAttention(nn.Module):
    """Per-channel weights from a shared two-layer MLP over the average- and max-pooled map, summed,
    sigmoid (CBAM's form, as WS-FCN's code): (B, C, h, w) -> x * w, w (B, C, 1, 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.ReLU(), nn.Conv2d(dim, dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        return x * torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))


class FlexibleContext(nn.Module):
    """WS-FCN's flexible context aggregation (FCA), added to the map through a residual gate.

    Four branches of separable dilated kernels (:class:`SeparableDilated`; kernel sizes 1, 3, 5, 7 at
    dilations 1, 12, 24, 36 on a stride-8 map), each reweighted by one channel attention shared by all
    branches, plus a global-average-pooling branch (1x1 conv, ReLU) broadcast over the grid; the five are
    concatenated, fused (1x1 conv, per-position channel norm), weighted by a residual spatial attention
    (``y + y * sigmoid(conv3x3([mean_c y, max_c y]))``) and dropped out (0.5), as the official code. Our
    adaptation: the official output (``hidden`` channels) replaces the features; here a 1x1 conv maps it
    back to D and it is added, ``x + gate * out(y)`` with a per-channel gate (0 at start: the unchanged
    pipeline), and the norm is a per-position LayerNorm, not BatchNorm, because the CAM passes without
    gradient at several scales would otherwise move the running statistics.

    Args:
        dim: channels D of the map.
        hidden: channels per branch (the code's 256).
        kernels: odd kernel length per branch.
        dilations: dilation per branch (see :func:`fca_dilations`).
        dropout: dropout on the fused context.
        gate_init: start of the per-channel gate.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        kernels: tuple[int, ...] = (1, 3, 5, 7),
        dilations: tuple[int, ...] = (1, 12, 24, 36),
        dropout: float = 0.5,
        gate_init: float = 0.0,
    ) -> None:
        super().__init__()
        if len(kernels) != len(dilations):
            raise ValueError(f"FCA needs one dilation per kernel, got kernels {kernels}, dilations {dilations}")
        self.branches = nn.ModuleList(SeparableDilated(dim, hidden, k, d) for k, d in zip(kernels, dilations))
        self.ca = ChannelAttention(hidden)
        self.pool = nn.Sequential(nn.Conv2d(dim, hidden, 1, bias=False), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(hidden * (len(kernels) + 1), hidden, 1, bias=False), ChannelNorm(hidden))
        self.spatial = nn.Conv2d(2, 1, 3, padding=1, bias=False)
        self.p = float(dropout)
        self.out = nn.Conv2d(hidden, dim, 1)
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init)))

    def context(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """The FCA output before the projection back to D: (B, D, h, w) -> (B, hidden, h, w). The
        training-mode dropout mask is drawn from ``gen`` (the step's sample-seeded generator) so that
        processes and accumulated micro-batches draw the same masks; None: the global RNG."""
        h, w = x.shape[-2:]
        outs = [self.ca(b(x)) for b in self.branches]
        outs.append(self.pool(x.mean((2, 3), keepdim=True)).expand(-1, -1, h, w))
        y = self.fuse(torch.cat(outs, 1))
        y = y + y * torch.sigmoid(self.spatial(torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)))
        if self.training and self.p > 0:
            keep = torch.rand(y.shape, generator=gen, device=y.device) >= self.p
            y = y * keep.to(y.dtype) / (1 - self.p)
        return y

    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, h, w): ``x + gate * out(context(x, gen))``."""
        return x + self.gate.to(x.dtype)[:, None, None] * self.out(self.context(x, gen))


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
        detail: torch.Tensor | int = 0
        for low, proj in zip(lows, self.proj):
            d = proj(low.to(high.dtype))
            detail = detail + (d if d.shape[-2:] == size else F.adaptive_avg_pool2d(d, cast("tuple[int, int]", size)))
        return high + self.gate.to(high.dtype)[:, None, None] * torch.sigmoid(self.sem(high)) * detail


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
        nn.init.zeros_(cast(torch.Tensor, self.flow.bias))  # Conv2d built with bias=True
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
