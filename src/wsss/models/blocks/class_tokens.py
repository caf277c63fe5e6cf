"""Learnable class tokens: one per foreground class, appended to the ViT token sequence."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class ClassTokens(nn.Module):
    """K learnable tokens, a per-class score head, and class-to-patch attention maps.

    The tokens (K, D) are appended after the patch tokens before the last ``blocks`` blocks, so they
    attend to the patches (and the patches to them) there; they carry no position embedding (their
    learned value is their identity). Token k gives the score of class k through its own weight
    vector: ``score_k = <w_k, t_k> + b_k``.

    How much the other tokens (prefix and patches) read from the class tokens is gated, one gate per
    block the tokens take part in (:func:`gated_block`): at gate 0 the patches attend only to each other,
    so the backbone's output is the one without class tokens; at gate 1 the attention is the block's own.

    Args:
        num_fg: foreground classes K.
        dim: token width D.
        blocks: blocks the tokens take part in (one read-back gate each).
        gate_init: start of the read-back gates (0: the backbone starts unchanged).
    """

    def __init__(self, num_fg: int, dim: int, blocks: int = 1, gate_init: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.full((blocks,), float(gate_init)))
        self.feat = nn.Parameter(torch.zeros(num_fg, dim))
        nn.init.trunc_normal_(self.feat, std=0.02)
        self.score_w = nn.Parameter(torch.zeros(num_fg, dim))
        nn.init.trunc_normal_(self.score_w, std=0.02)
        self.score_b = nn.Parameter(torch.zeros(num_fg))

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence (B, T, D) -> (B, T + K, D) with the class tokens at the end."""
        return torch.cat([x, self.feat.to(x.dtype).expand(x.shape[0], -1, -1)], 1)

    def scores(self, final: torch.Tensor) -> torch.Tensor:
        """Class scores (B, K) from the final (normed) class tokens (B, K, D)."""
        return (final * self.score_w).sum(-1) + self.score_b

    def read_gate(self, j: int) -> torch.Tensor:
        """Gate of the ``j``-th block the tokens take part in, clamped at 0 with a straight-through
        gradient (a gate at 0 still learns whether to open)."""
        g = self.gate[j]
        return g + (g.clamp_min(0) - g).detach()

    @staticmethod
    def attention_maps(attn: torch.Tensor, first_patch: int, h: int, w: int) -> torch.Tensor:
        """Class-to-patch attention (B, K, h, w), averaged over heads, from attention (B, heads, T, T)
        whose last K rows are the class tokens and whose patch columns start at ``first_patch``."""
        B, _, T, _ = attn.shape
        K = T - first_patch - h * w
        a = attn[:, :, T - K :, first_patch : first_patch + h * w].mean(1)
        return a.reshape(B, K, h, w)


def gated_block(blk: Any, x: torch.Tensor, n_app: int, gate: torch.Tensor) -> torch.Tensor:
    """timm ViT block ``blk`` on tokens (B, T, D) whose last ``n_app`` are appended class tokens, with the
    attention of every other token to them scaled by ``gate`` and renormalised:
    ``a_ij = g^[j appended] exp(s_ij) / sum_j' g^[j' appended] exp(s_ij')`` for the non-appended rows i.
    Gate 1: the block's own output; gate 0: the non-appended tokens' output is the block's output without
    the appended ones. The appended tokens attend to everything. (B, T, D) -> (B, T, D)."""
    attn = blk.attn
    B, T, _ = x.shape
    xn = blk.norm1(x)
    qkv = attn.qkv(xn).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    s = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, T, T)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    idx = torch.arange(T, device=x.device)
    read = (idx[:, None] < T - n_app) & (idx[None, :] >= T - n_app)  # (T, T): other tokens -> class tokens
    e = torch.where(read, e * gate.to(e.dtype), e)
    a = attn.attn_drop(e / e.sum(-1, keepdim=True))
    y = (a @ v).transpose(1, 2).reshape(B, T, -1)
    y = attn.norm(y)
    if getattr(attn, "gate", None) is not None:  # timm's gated attention variants
        y = y * attn.gate(xn).sigmoid()
    y = attn.proj_drop(attn.proj(y))
    x = x + blk.drop_path1(blk.ls1(y))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
