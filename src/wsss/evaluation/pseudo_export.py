"""``wsss pseudo-labels``: a weak run's pseudo labels for a split, as palette PNGs for a second stage.

Each image's labels are the method's own ``pseudo_labels`` (CAMs of the tags, multi-scale and flipped as
the run's ``method.cam_scales`` / ``method.cam_flip`` say, PAR-refined, 255 in the uncertain band) on the
whole image, optionally sharpened by a dense CRF. ``pseudo_labels.json`` beside them records the run,
the method's settings, the classes and each image's labelled share; ``wsss train --data.mask_dir DIR``
trains a segmentation network on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from wsss.data.classes import ClassSpec
from wsss.data.io import write_mask
from wsss.evaluation.outputs import guard_outputs, planned_records, write_index

INDEX = "pseudo_labels.json"
# The CRF's unary for a labelled pixel: its label at 0.7, the image's other classes sharing the rest
# (the usual "unary from labels" confidence); uncertain pixels start uniform over the image's classes.
GT_PROB = 0.7
# After the CRF a pixel keeps a label only where one class holds at least this probability; the rest
# stays 255, so the CRF sharpens boundaries without forcing a guess where the evidence is split.
KEEP_PROB = 0.5


def crf_labels(label: torch.Tensor, image: torch.Tensor, tags: torch.Tensor, classes: ClassSpec, backend: str,
               gt_prob: float = GT_PROB, keep: float = KEEP_PROB) -> torch.Tensor:  # fmt: skip
    """Pseudo labels (B, H, W) sharpened by a dense CRF.

    Args:
        label: (B, H, W) labels with ``classes.ignore_index`` for uncertain pixels.
        image: (B, 3, H, W) RGB in 0..255.
        tags: (B, C) multi-hot image tags: only the tagged classes (and background) can be assigned.
        backend: a CRF backend name (``torch`` or ``dense``, see :mod:`wsss.cam.crf`).
    Returns:
        (B, H, W) long: the CRF's most probable class where it holds at least ``keep``, else ignore.
    """
    from wsss.cam.crf import apply_crf

    B, H, W = label.shape
    K, o, ign = classes.K, classes.fg_offset, classes.ignore_index
    allowed = torch.zeros(B, K, dtype=torch.bool, device=label.device)
    allowed[:, o : o + classes.num_fg] = tags > 0
    if classes.background:
        allowed[:, 0] = True
    n = allowed.sum(1).clamp(min=1).float()[:, None, None, None]  # (B, 1, 1, 1) classes per image
    known = label != ign
    onehot = torch.zeros(B, K, H, W, device=label.device)
    onehot.scatter_(1, label.masked_fill(~known, 0)[:, None], 1.0)
    other = torch.where(n > 1, (1 - gt_prob) / (n - 1).clamp(min=1), torch.ones_like(n))
    sure = torch.where(onehot > 0, torch.full_like(onehot, gt_prob), other.expand_as(onehot))
    probs = torch.where(known[:, None], sure, (1 / n).expand_as(onehot)) * allowed[:, :, None, None]
    probs = probs.clamp(min=1e-8)
    q = apply_crf(backend, probs / probs.sum(1, keepdim=True), image)
    top, arg = q.max(1)
    return torch.where(top >= keep, arg, torch.full_like(arg, ign)).long()


def planned_files(items) -> dict[str, list[str]]:
    """Image name -> the file it gets (``<name>.png``)."""
    return {Path(it.name).name: [f"{Path(it.name).name}.png"] for it in items}


def check_label_outputs(items, out_dir: Path, overwrite: bool) -> dict:
    """:func:`wsss.evaluation.outputs.guard_outputs` for the label files of ``items``; returns the earlier
    index (settings and ``images`` records; empty when there is none)."""
    inputs = {it.image.resolve() for it in items} | {it.mask.resolve() for it in items if it.mask is not None}
    return guard_outputs(out_dir, planned_files(items), inputs, INDEX, overwrite, "wsss pseudo-labels")


def method_settings(method_cfg) -> dict:
    """The method's config as plain JSON values (what decided the labels: thresholds, scales, PAR)."""
    if dataclasses.is_dataclass(method_cfg) and not isinstance(method_cfg, type):
        return dataclasses.asdict(method_cfg)
    return {}


@torch.no_grad()
def export_pseudo_labels(method, loader, classes: ClassSpec, device, out_dir: Path, crf: str = "none",
                         progress=None, meta: dict | None = None,
                         earlier: Sequence[dict] = ()) -> list[dict]:  # fmt: skip
    """Write ``out_dir/<name>.png`` (palette PNG, indices into ``classes.seg_names``, 255 uncertain) for each
    image of ``loader`` (whole images with their tags) and ``out_dir/pseudo_labels.json``.

    Returns:
        Per-image records: name, size (H, W), labelled share (pixels not 255), file written.
    """
    from wsss.data.transforms import denormalize

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**(meta or {}), "classes": list(classes.seg_names), "ignore_index": classes.ignore_index, "crf": crf}
    write_index(out_dir / INDEX, meta, planned_records(planned_files(loader.dataset.items)), earlier)
    was_training = method.training
    method.eval()
    records = []
    for batch in progress(loader) if progress else loader:
        x, tags = batch["image"].to(device), batch["tags"].to(device)
        label = method.pseudo_labels(x, tags, batch["valid"].to(device))
        if crf != "none":
            label = crf_labels(label, denormalize(x.float()) * 255.0, tags, classes, crf)
        for i, name in enumerate(batch["name"]):
            name = Path(name).name
            lab = label[i].to(torch.uint8).cpu().numpy()
            write_mask(out_dir / f"{name}.png", lab, classes.palette)
            records.append({"name": name, "size": list(lab.shape),
                            "labelled": round(float((lab != classes.ignore_index).mean()), 6),
                            "outputs": [f"{name}.png"]})  # fmt: skip
    method.train(was_training)
    write_index(out_dir / INDEX, meta, records, earlier)
    return records
