"""FSR's aggregation token (class-attention blocks); its DINO-style head is wsss.models.heads.ProjectionHead."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassAttentionBlock(nn.Module):
    """One CaiT-style class-attention block: the token (B, 1, D) attends to the patches (B, N, D).

    Pre-norm on ``[token; patches]``; the query comes from the token only and keys / values from the
    patches only (as FSR); residual; then an MLP (4x, GELU) on the token with a residual. The patches
    are not changed.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        # No key bias: it shifts every logit of a query equally, so its true gradient is 0, and Adam would
        # turn the rounding noise of that 0 into full-size steps.
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, tok: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """tok (B, 1, D), patches (B, N, D) -> refined tok (B, 1, D)."""
        B, N, D = patches.shape
        H = self.heads
        t, p = self.norm1(tok), self.norm1(patches)
        q = self.q(t).view(B, 1, H, D // H).transpose(1, 2)
        k = self.k(p).view(B, N, H, D // H).transpose(1, 2)
        v = self.v(p).view(B, N, H, D // H).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
        tok = tok + self.proj(a)
        return tok + self.mlp(self.norm2(tok))


class AggregationToken(nn.Module):
    """A learnable token refined by ``depth`` class-attention blocks over the patch tokens, then normed.

    Args:
        dim: D; heads: attention heads; depth: blocks (FSR: 2).
    """

    def __init__(self, dim: int, heads: int, depth: int = 2) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.token, std=0.02)
        self.blocks = nn.ModuleList(ClassAttentionBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """Patch map (B, D, h, w) -> aggregated token (B, D)."""
        patches = feat.flatten(2).transpose(1, 2)
        tok = self.token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        for blk in self.blocks:
            tok = blk(tok, patches)
        return self.norm(tok)[:, 0]
