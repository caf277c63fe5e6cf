"""``fully_supervised``: the same backbone and seg head trained on ground-truth masks.

The upper bound every WSSS figure is compared with (same backbone, crop, schedule and head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wsss.losses.segmentation import seg_loss
from wsss.methods.base import Method, StepOutput, upsample
from wsss.models.heads import LargeFOVHead
from wsss.registry import METHODS


@METHODS.register("fully_supervised")
class FullySupervised(Method):
    """Backbone + LargeFOV head, pixel CE on masks (255 ignored)."""

    needs_masks = True
    has_cams = False

    @dataclass(frozen=True)
    class Config:
        """No hyper-parameters of its own beyond the shared model/optim settings."""

        w_seg: float = 1.0

    def __init__(self, cfg: Config, classes, backbone, model_cfg) -> None:
        super().__init__(cfg, classes, backbone, model_cfg)
        self.seg_head = LargeFOVHead(backbone.embed_dim, model_cfg.seg_hidden, classes.K)

    def train_step(self, batch: dict, it: int) -> StepOutput:
        """CE of seg logits against batch["mask"] (B, H, W)."""
        loss = seg_loss(self.seg_head(self.backbone(batch["image"]).tokens), batch["mask"], self.classes.ignore_index)
        return StepOutput(self.cfg.w_seg * loss, {"seg": loss.detach()})

    def predict_seg(self, images: torch.Tensor) -> torch.Tensor:
        """Seg logits (B, K, H, W)."""
        return upsample(self.seg_head(self.backbone(images).tokens), images.shape[-2:])
