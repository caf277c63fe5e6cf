"""An out-of-tree wsss plugin: one method and one dataset, registered when wsss loads its ``wsss.plugins``
entry points (see pyproject.toml beside this file, and "Extending wsss" in docs/architecture.md).

- method ``gap_cam``: the plainest weakly supervised model, a 1 x 1 classifier on the backbone's patch map,
  global average pooling and a multi-label loss; its CAMs are the segmentation.
- dataset ``manifest``: a folder with ``classes.txt`` and ``manifest.jsonl``, one JSON object per image:
  ``{"image": "a.jpg", "tags": ["dog"], "split": "train", "mask": "a.png"}`` (``mask`` optional).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsss.data.base import Item, SegDataset, data_root
from wsss.data.check import check_items
from wsss.data.classes import ClassSpec
from wsss.data.io import DataError
from wsss.data.spec import DatasetSpec
from wsss.methods.base import Method, StepOutput, upsample
from wsss.registry import DATASETS, METHODS


@METHODS.register("gap_cam")
class GapCam(Method):
    """CAMs (B, C, h, w) from a 1 x 1 conv on the patch map, trained by global average pooling."""

    @dataclass(frozen=True)
    class Config:
        """``w_cls``: weight of the multi-label soft-margin loss."""

        w_cls: float = 1.0

    def __init__(self, cfg: Config, classes: ClassSpec, backbone: nn.Module, model_cfg) -> None:
        super().__init__(cfg, classes, backbone, model_cfg)
        self.classifier = nn.Conv2d(backbone.embed_dim, classes.num_fg, 1, bias=False)

    def _cam_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) class scores on the backbone's token grid."""
        return self.classifier(self.backbone(images).feat)

    def train_step(self, batch: dict, it: int) -> StepOutput:
        """Multi-label soft margin between the pooled scores (B, C) and the tags (B, C)."""
        logits = self._cam_logits(batch["image"]).mean((2, 3))
        loss = F.multilabel_soft_margin_loss(logits, batch["tags"].float())
        return StepOutput(self.cfg.w_cls * loss, {"cls": loss.detach()})

    def predict_cams(self, images: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
        """CAMs (B, C, H, W): ReLU scores, each class divided by its maximum."""
        cam = F.relu(self._cam_logits(images).float())
        cam = cam / cam.flatten(2).amax(2).clamp_min(1e-5)[..., None, None]
        return upsample(cam, images.shape[-2:])

    def pseudo_labels(self, images, tags, valid=None, cams=None) -> torch.Tensor:
        """(B, H, W): the tagged class of highest CAM, background where none reaches 0.5 (no ignore band)."""
        cams = self.predict_cams(images) if cams is None else cams
        cams = cams * tags[:, :, None, None].to(cams.dtype)
        score, label = cams.max(1)
        return torch.where(score < 0.5, 0, label + self.classes.fg_offset)

    def predict_seg(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W): the CAMs, with background scored as one minus the strongest class."""
        cams = self.predict_cams(images)
        return torch.cat([1 - cams.amax(1, keepdim=True), cams], 1) if self.classes.background else cams


class ManifestDataset(DatasetSpec):
    """ROOT/classes.txt + ROOT/manifest.jsonl; ROOT is data.train_root / data.val_root / data.root."""

    layout = "manifest (manifest.jsonl, classes.txt)"

    def rows(self, root: Path) -> tuple[ClassSpec, list[tuple[int, dict]]]:
        """(classes, [(line number, row)]) of ROOT; a one-line DataError naming the file otherwise."""
        path = root / "manifest.jsonl"
        classes = ClassSpec(tuple(n.strip() for n in (root / "classes.txt").read_text().splitlines() if n.strip()))
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            row = json.loads(line)
            if unknown := set(row["tags"]) - set(classes.names):
                raise DataError(f"{path}:{i}: tags not in classes.txt: {', '.join(sorted(unknown))}")
            rows.append((i, row))
        return classes, rows

    def items(self, root: Path, rows: list[tuple[int, dict]], split: str | None) -> list[Item]:
        """The rows of ``split`` (None: all) as Items."""
        return [Item(Path(r["image"]).stem, root / r["image"], root / r["mask"] if r.get("mask") else None,
                     tuple(r["tags"])) for _, r in rows if split is None or r.get("split") == split]  # fmt: skip

    def build(self, cfg, split: str, transform, load_masks: bool) -> SegDataset:
        """The images of ``split``."""
        explicit = (cfg.train_root if split == cfg.train_split else cfg.val_root) or cfg.root
        root = data_root(explicit, "manifest")
        classes, rows = self.rows(root)
        items = self.items(root, rows, split)
        if not items:
            raise DataError(f"{root / 'manifest.jsonl'}: no images of split '{split}'")
        return SegDataset(items, classes, transform, load_masks)  # wsss sets data.max_side on it

    def detect(self, root: Path) -> int:
        """`wsss data check ROOT` picks this dataset when ROOT has a manifest.jsonl."""
        return 3 if (root / "manifest.jsonl").is_file() else 0

    def check(self, root: Path) -> list[tuple[str, str]]:
        """wsss's own image, mask and tag checks over every row."""
        try:
            classes, rows = self.rows(root)
        except (OSError, ValueError) as e:  # DataError and json's errors are ValueErrors
            return [("error", f"{root}: {e}")]
        return check_items(self.items(root, rows, None), classes)


DATASETS.register("manifest")(ManifestDataset())
