"""From CAMs to pseudo labels: thresholds, ignore band, PAR refinement with a background channel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss.cam.par import par_refine
from wsss.data.classes import IGNORE_INDEX, ClassSpec


def cam_to_label(
    cam: torch.Tensor,
    tags: torch.Tensor,
    classes: ClassSpec,
    high: float = 0.7,
    low: float = 0.25,
    bkg: float | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pseudo labels (B, H, W) from CAMs (B, C, H, W) in [0, 1] and image tags (B, C).

    Training form (``bkg`` None): the best present class wins where its CAM > ``high``; pixels with
    max CAM <= ``low`` are background; the band in between is ignored (255). Evaluation form
    (``bkg`` given): pixels with max CAM <= ``bkg`` are background, the rest their best class.
    Without a background class, pixels that would be background are ignored. Pixels outside
    ``valid`` (B, H, W) are ignored.
    """
    value, idx = (cam * tags[:, :, None, None]).max(dim=1)
    label = idx + classes.fg_offset
    bg = classes.ignore_index if not classes.background else 0
    if bkg is None:
        label[value <= high] = classes.ignore_index
        label[value <= low] = bg
    else:
        label[value <= bkg] = bg
    if valid is not None:
        label[~valid] = classes.ignore_index
    return label


def _present_index(tags: torch.Tensor) -> torch.Tensor:
    """(B, P) indices of present classes, padded with -1; P = max present count in the batch."""
    P = max(int(tags.sum(1).max().item()), 1)
    order = torch.argsort(tags.float(), dim=1, descending=True, stable=True)[:, :P]
    present = torch.gather(tags, 1, order) > 0
    return torch.where(present, order, torch.full_like(order, -1))


def refine_pseudo_labels(
    cam: torch.Tensor,
    image: torch.Tensor,
    tags: torch.Tensor,
    classes: ClassSpec,
    high: float = 0.7,
    low: float = 0.25,
    scale: float = 0.5,
    par_iters: int = 10,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """PAR-refined pseudo labels (B, H, W) from CAMs (B, C, H, W) and de-normalised images (B, 3, H, W).

    Two stacks get a constant background channel, one at ``high`` and one at ``low``; each keeps only
    the image's present classes, is soft-maxed over channels, refined by PAR at ``scale`` of the image
    and arg-maxed. A pixel is foreground where the high-background stack says so, background where
    both stacks say background, and ignored otherwise. Only the present classes (at most P per image)
    are propagated, so PAR's cost does not grow with the number of dataset classes.
    Without a background class: argmax of the PAR-refined present-class maps, ignored where the raw
    max CAM is <= ``low``.
    """
    B, C, H, W = cam.shape
    idx = _present_index(tags)  # (B, P)
    gathered = torch.gather(cam, 1, idx.clamp(min=0)[:, :, None, None].expand(-1, -1, H, W))
    absent = (idx < 0)[:, :, None, None]
    small = lambda x: F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1 else x  # noqa: E731
    img_s = small(image)
    if classes.background:
        stacks = []
        for thr in (high, low):
            bgc = torch.full_like(gathered[:, :1], thr)
            x = torch.cat([bgc, gathered.masked_fill(absent, float("-inf"))], 1).softmax(1)
            stacks.append(small(x))
        # Both stacks share the image, so they go through PAR as extra channels of one pass.
        refined = par_refine(img_s, torch.cat(stacks, 1), par_iters, dilations)
        refined = F.interpolate(refined, size=(H, W), mode="bilinear", align_corners=False)
        n = refined.shape[1] // 2
        arg_h, arg_l = refined[:, :n].max(1).indices, refined[:, n:].max(1).indices
        cls_h = torch.gather(idx, 1, (arg_h - 1).clamp(min=0).flatten(1)).view(B, H, W) + classes.fg_offset
        label = torch.full_like(arg_h, classes.ignore_index)
        label = torch.where(arg_h > 0, cls_h, label)
        label = torch.where((arg_h == 0) & (arg_l == 0), torch.zeros_like(label), label)
    else:
        x = small(gathered.masked_fill(absent, float("-inf")).softmax(1))
        refined = F.interpolate(
            par_refine(img_s, x, par_iters, dilations), size=(H, W), mode="bilinear", align_corners=False
        )
        label = torch.gather(idx, 1, refined.max(1).indices.flatten(1)).view(B, H, W)
        label[(cam * tags[:, :, None, None]).amax(1) <= low] = classes.ignore_index
    if valid is not None:
        label[~valid] = classes.ignore_index
    return label.long()


__all__ = ["IGNORE_INDEX", "cam_to_label", "refine_pseudo_labels"]
