"""Supervised contrastive losses over embeddings: within a batch (SupCon) and against a memory bank."""

from __future__ import annotations

import torch


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form).

    For anchor i with positives P(i) (same label, not i itself):
    ``L_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )``,
    averaged over the anchors that have a positive (0 with a graph when none has).

    Args:
        z: (N, E) unit embeddings.
        labels: (N,) integer labels.
        temp: temperature t.
    """
    N = z.shape[0]
    if N < 2:
        return z.sum() * 0.0
    eye = torch.eye(N, dtype=torch.bool, device=z.device)
    logits = (z @ z.t() / temp).masked_fill(eye, float("-inf"))
    log_prob = (logits - torch.logsumexp(logits, 1, keepdim=True)).masked_fill(eye, 0.0)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    per_anchor = -(log_prob * pos).sum(1) / n_pos.clamp(min=1)
    return per_anchor[has].mean()


def memory_contrast(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    temp: float = 0.1,
    gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive memory contrast: InfoNCE of anchors against a bank, weighted towards hard anchors.

    ``L_i = -1/|P(i)| sum_{p in P(i)} log( exp(a_i.m_p / t) / sum_{all m} exp(a_i.m / t) )`` with P(i)
    the bank entries of i's class; each anchor is weighted by its hardness
    ``w_i = clamp(1 - mean_{p in P(i)} a_i.m_p, 0, 2) ** gamma`` (no gradient through w), and the loss
    is ``sum_i w_i L_i / #anchors`` over anchors whose class is in the bank: anchors already close to
    their class memory fade out (focal-style), hard ones (fine-grained, uncertain regions) dominate.

    Args:
        anchors: (N, E) unit embeddings with gradient.
        anchor_labels: (N,) class ids.
        bank: (L, E) unit embeddings (no gradient).
        bank_labels: (L,) class ids.
        temp: temperature t.
        gamma: focusing exponent (0: plain mean).
    Returns:
        (loss, weights (N,), 0 for anchors without positives).
    """
    sim = anchors @ bank.t()
    log_prob = torch.log_softmax(sim / temp, 1)
    per_anchor, has = positive_nll(log_prob, anchor_labels, bank_labels)
    pos = anchor_labels[:, None] == bank_labels[None, :]
    n_pos = pos.sum(1)
    mean_pos = ((sim * pos).sum(1) / n_pos.clamp(min=1)).detach()
    w = (1 - mean_pos).clamp(0, 2).pow(gamma) * has
    if not bool(has.any()):
        return anchors.sum() * 0.0, w
    return (w * per_anchor).sum() / has.sum(), w


def positive_nll(log_prob: torch.Tensor, anchor_labels: torch.Tensor, bank_labels: torch.Tensor):
    """Per-anchor mean negative log-probability of its positives.

    Args:
        log_prob: (N, L) log-softmax of anchor-to-bank similarities over the bank.
        anchor_labels: (N,) class ids.
        bank_labels: (L,) class ids.
    Returns:
        (loss (N,) ``-1/|P(i)| sum_{p in P(i)} log_prob[i, p]``, 0 where P(i) is empty; has (N,) bool).
    """
    pos = anchor_labels[:, None] == bank_labels[None, :]
    n_pos = pos.sum(1)
    return -(log_prob * pos).sum(1) / n_pos.clamp(min=1), n_pos > 0
