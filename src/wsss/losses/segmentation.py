"""Segmentation cross-entropy on (pseudo) labels."""

import torch
import torch.nn.functional as F


def balanced_seg_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """0.5 * (CE over background pixels + CE over foreground pixels), ToCo's seg loss.

    Args:
        logits: (B, K, H, W), label 0 = background.
        label: (B, H, W) long, ``ignore_index`` skipped.
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    bg = label.clone()
    bg[label != 0] = ignore_index
    fg = label.clone()
    fg[label == 0] = ignore_index
    logp = F.log_softmax(logits, 1)  # once for both halves: cross_entropy is nll_loss of log_softmax
    return 0.5 * (_nll(logp, bg, ignore_index) + _nll(logp, fg, ignore_index))


def seg_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Plain CE of logits (B, K, h, w) (upsampled to the label) against label (B, H, W)."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return _ce(logits, label, ignore_index)


def _ce(logits: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return _nll(F.log_softmax(logits, 1), label, ignore_index)


def _nll(logp: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # A batch with no valid pixel gives 0 (with graph) instead of NaN.
    if not bool((label != ignore_index).any()):
        return logp.sum() * 0.0
    return F.nll_loss(logp, label, ignore_index=ignore_index)
