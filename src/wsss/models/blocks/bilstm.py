"""CF-BiLSTM: contextual fusion of the ViT patch grid by bidirectional LSTMs along rows and columns."""

from __future__ import annotations

import torch
import torch.nn as nn


class CFBiLSTM(nn.Module):
    """Four-direction LSTM context over a token grid, fused back into the tokens through a gate.

    Tokens are normalised and projected to ``hidden``; one bidirectional LSTM runs along every row
    (B*h sequences of length w) and one along every column (B*w sequences of length h), each as a
    single batched call; the four directional states (4*hidden) are fused by a linear layer back to
    ``dim`` and added to the tokens through a per-channel gate initialised at ``gate_init`` (0: the
    block starts as the identity and cannot disturb a pretrained backbone). After one block, every
    token has seen its whole row and column; two stacked blocks see the whole grid.

    Args:
        dim: token width D.
        hidden: LSTM hidden size H per direction.
        gate_init: initial value of the per-channel residual gate.
    """

    def __init__(self, dim: int, hidden: int, gate_init: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.inp = nn.Linear(dim, hidden)
        self.row = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.col = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.fuse = nn.Linear(4 * hidden, dim)
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init)))

    def context(self, grid: torch.Tensor) -> torch.Tensor:
        """Fused four-direction context (B, h, w, D) of a token grid (B, h, w, D), before the gate."""
        B, h, w, _ = grid.shape
        z = self.inp(self.norm(grid))  # (B, h, w, H)
        H = z.shape[-1]
        # The recurrences run in fp32 under autocast: cuDNN's low-precision RNN support varies by dtype.
        with torch.autocast(grid.device.type, enabled=False):
            z = z.float()
            rows, _ = self.row(z.reshape(B * h, w, H))  # left->right and right->left states
            cols, _ = self.col(z.transpose(1, 2).reshape(B * w, h, H))  # top->down and bottom->up
        rows = rows.reshape(B, h, w, 2 * H)
        cols = cols.reshape(B, w, h, 2 * H).transpose(1, 2)
        return self.fuse(torch.cat([rows, cols], -1))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """Tokens plus gated context: (B, h, w, D) -> (B, h, w, D)."""
        return grid + self.gate * self.context(grid)
