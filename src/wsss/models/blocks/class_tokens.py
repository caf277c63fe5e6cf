"""Learnable class tokens: one per foreground class, appended to the ViT token sequence."""

from __future__ import annotations

import torch
import torch.nn as nn


class ClassTokens(nn.Module):
    """K learnable tokens, a per-class score head, and class-to-patch attention maps.

    The tokens (K, D) are appended after the patch tokens before the last ``blocks`` blocks, so they
    attend to the patches (and the patches to them) there; they carry no position embedding (their
    learned value is their identity). Token k gives the score of class k through its own weight
    vector: ``score_k = <w_k, t_k> + b_k``.

    Args:
        num_fg: foreground classes K.
        dim: token width D.
    """

    def __init__(self, num_fg: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(num_fg, dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)
        self.score_w = nn.Parameter(torch.zeros(num_fg, dim))
        nn.init.trunc_normal_(self.score_w, std=0.02)
        self.score_b = nn.Parameter(torch.zeros(num_fg))

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence (B, T, D) -> (B, T + K, D) with the class tokens at the end."""
        return torch.cat([x, self.tokens.to(x.dtype).expand(x.shape[0], -1, -1)], 1)

    def scores(self, final: torch.Tensor) -> torch.Tensor:
        """Class scores (B, K) from the final (normed) class tokens (B, K, D)."""
        return (final * self.score_w).sum(-1) + self.score_b

    @staticmethod
    def attention_maps(attn: torch.Tensor, first_patch: int, h: int, w: int) -> torch.Tensor:
        """Class-to-patch attention (B, K, h, w), averaged over heads, from attention (B, heads, T, T)
        whose last K rows are the class tokens and whose patch columns start at ``first_patch``."""
        B, _, T, _ = attn.shape
        K = T - first_patch - h * w
        a = attn[:, :, T - K :, first_patch : first_patch + h * w].mean(1)
        return a.reshape(B, K, h, w)
