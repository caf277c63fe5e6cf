"""Multi-label classification loss."""

import torch
import torch.nn.functional as F


def multilabel_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Multi-label soft-margin loss of logits (B, C) against multi-hot tags (B, C)."""
    return F.multilabel_soft_margin_loss(logits, tags)
