"""Class regions on the token grid, shared by the modules that pool region embeddings (STCL, RCA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss.methods.pipeline import StepState


def tokens(feat: torch.Tensor) -> torch.Tensor:
    """Token rows (B, N, D) of a map (B, D, h, w)."""
    return feat.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


def region_masks(state: StepState, classes, high: float, low: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(confident, uncertain) token masks (B, C, N) per present class, from the step's token labels.

    Confident: token label is the class. Uncertain: token in the ignore band, inside the image, whose
    strongest present-class aux CAM is the class.
    """
    B, C = state.tags.shape
    h, w = state.feat.shape[-2:]
    lab = state.tok_labels.flatten(1)  # (B, N)
    cls_ids = torch.arange(C, device=lab.device) + classes.fg_offset
    present = state.tags.bool()[:, :, None]
    conf = (lab[:, None] == cls_ids[None, :, None]) & present
    aux = F.interpolate(state.aux_cam, size=(h, w), mode="bilinear", align_corners=False) * state.tags[:, :, None, None]
    val, top = aux.flatten(2).max(1)  # (B, N)
    band = (lab == classes.ignore_index) & state.tok_valid.flatten(1) & (val > low) & (val <= high)
    unc = band[:, None] & (top[:, None] == torch.arange(C, device=lab.device)[None, :, None]) & present
    return conf, unc


def region_means(z: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit mean embeddings (B, C, E) of tokens z (B, N, E) under masks (B, C, N), and which are non-empty."""
    m = masks.to(z.dtype)
    cnt = m.sum(-1)
    return F.normalize(torch.bmm(m, z) / cnt.clamp(min=1)[..., None], dim=-1), cnt > 0
