"""``fully_supervised``: the same backbone and seg head trained on masks.

The upper bound every WSSS figure is compared with (same backbone, crop, schedule and head), and the
second stage of a weak run: trained on its exported pseudo labels (``--data.mask_dir``). With
``method.head deeplabv3`` on a ResNet at output stride 8 it is torchvision's DeepLabV3
(``configs/second_stage/``), the classic second-stage network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wsss.losses.segmentation import seg_loss
from wsss.methods.base import Method, StepOutput, upsample
from wsss.models.heads import SEG_HEADS, seg_head
from wsss.registry import METHODS


@METHODS.register("fully_supervised")
class FullySupervised(Method):
    """Backbone + seg head (LargeFOV or DeepLabV3), pixel CE on masks (255 ignored)."""

    needs_masks = True
    has_cams = False

    @dataclass(frozen=True)
    class Config:
        """The seg loss weight and the head (``largefov`` | ``deeplabv3``, see :func:`wsss.models.heads.seg_head`)."""

        w_seg: float = 1.0
        head: str = "largefov"

        def __post_init__(self) -> None:
            from wsss.config import ConfigError

            if self.head not in SEG_HEADS:
                raise ConfigError(f"config key 'method.head' must be one of {', '.join(SEG_HEADS)}, got {self.head!r}")

    @classmethod
    def validate(cls, run_cfg) -> None:
        """DeepLabV3's ASPP image pooling normalises a 1 x 1 map with BatchNorm: it needs at least 2
        images per process and step (a micro-batch of 1 fails inside torch with a traceback)."""
        from wsss.config import ConfigError

        t = run_cfg.train
        if run_cfg.method.head == "deeplabv3" and (t.micro_batch or t.batch_size) < 2:
            raise ConfigError("config key 'method.head': deeplabv3's BatchNorm needs at least 2 images per "
                              f"step and process (train.batch_size {t.batch_size}, "
                              f"micro_batch {t.micro_batch})")  # fmt: skip

    def __init__(self, cfg: Config, classes, backbone, model_cfg) -> None:
        super().__init__(cfg, classes, backbone, model_cfg)
        self.seg_head = seg_head(cfg.head, backbone.embed_dim, model_cfg.seg_hidden, classes.K)

    def train_step(self, batch: dict, it: int) -> StepOutput:
        """CE of seg logits against batch["mask"] (B, H, W)."""
        loss = seg_loss(self.seg_head(self.backbone(batch["image"]).feat), batch["mask"], self.classes.ignore_index)
        return StepOutput(self.cfg.w_seg * loss, {"seg": loss.detach()})

    def predict_seg(self, images: torch.Tensor) -> torch.Tensor:
        """Seg logits (B, K, H, W)."""
        return upsample(self.seg_head(self.backbone(images).feat), images.shape[-2:])
