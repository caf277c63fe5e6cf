"""FSR's aggregation token (class-attention blocks) and DINO-style projection head."""

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


class DINOHead(nn.Module):
    """MLP (D -> hidden -> hidden -> bottleneck, GELU), L2-normalise, weight-normalised linear to K logits.

    The last layer's weight-norm gain is fixed at 1 (DINO / FSR), so the logits are cosines scaled by
    the direction vectors' unit norm.
    """

    def __init__(self, dim: int, out_dim: int = 4096, hidden: int = 2048, bottleneck: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.last = nn.Linear(bottleneck, out_dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> logits (..., K)."""
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.last.weight, dim=1).t().to(z.dtype)
