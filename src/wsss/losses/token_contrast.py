"""Patch token contrast (ToCo's PTC): pull together tokens of the same pseudo class, push apart others."""

import torch
import torch.nn.functional as F


def affinity_targets(token_labels: torch.Tensor, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative pair masks (B, N, N) from token labels (B, N); ignored tokens and i = j excluded."""
    valid = token_labels != ignore_index
    pair_valid = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(token_labels.shape[1], dtype=torch.bool, device=token_labels.device)[None]
    same = token_labels[:, :, None] == token_labels[:, None, :]
    pos = same & pair_valid & ~eye
    neg = ~same & pair_valid
    return pos, neg


def patch_token_contrast(tokens: torch.Tensor, token_labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """PTC loss 0.5 * (1 - mean_pos |cos|) + 0.5 * mean_neg |cos| (means with +1 in the denominators).

    Args:
        tokens: (B, D, h, w) patch features.
        token_labels: (B, h, w) labels per token, ``ignore_index`` skipped.
    """
    f = F.normalize(tokens.flatten(2), dim=1)  # (B, D, N)
    sim = torch.bmm(f.transpose(1, 2), f).abs()  # (B, N, N)
    pos, neg = affinity_targets(token_labels.flatten(1), ignore_index)
    pos_term = 1 - (sim * pos).sum() / (pos.sum() + 1)
    neg_term = (sim * neg).sum() / (neg.sum() + 1)
    return 0.5 * pos_term + 0.5 * neg_term
