"""``toco``: the single-stage baseline (ToCo, CVPR 2023) every other method builds on.

ViT patch tokens -> CAM head (global max pooling + 1x1 conv) and an auxiliary CAM head on block
``model.aux_layer``; multi-scale flipped CAMs -> PAR-refined pseudo labels (high/low thresholds,
ignore band) -> LargeFOV seg head trained after ``seg_warmup`` iterations; patch token contrast
(PTC) on token labels from the auxiliary CAM.

Differences from the official code, all for speed, none changing a loss: the no-grad CAM passes run
only the backbone and CAM heads (never the seg head), each scale's image and its flip go through one
batched pass, PAR propagates only each image's present classes, and PAR is skipped while the seg
loss is still off. ToCo's class-token contrast (CTC) is not implemented yet (``w_ctc`` is rejected
until it is); its dense-CRF energy regulariser neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsss.cam.cam import multi_scale_cam
from wsss.cam.labels import cam_to_label, refine_pseudo_labels
from wsss.data.transforms import denormalize
from wsss.losses.classification import multilabel_loss
from wsss.losses.segmentation import balanced_seg_loss
from wsss.losses.token_contrast import patch_token_contrast
from wsss.methods.base import Method, StepOutput, upsample
from wsss.models.heads import CAMHead, LargeFOVHead
from wsss.registry import METHODS


@METHODS.register("toco")
class ToCo(Method):
    """Single-stage WSSS baseline; see the module docstring."""

    @dataclass(frozen=True)
    class Config:
        """ToCo hyper-parameters (VOC defaults)."""

        high_thre: float = 0.7
        low_thre: float = 0.25
        bkg_thre: float = 0.5  # background threshold when CAMs are scored as labels
        cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
        cam_flip: bool = True
        par_iters: int = 10
        par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
        par_scale: float = 0.5
        w_aux_cls: float = 1.0
        w_ptc: float = 0.2
        w_seg: float = 0.1
        seg_warmup: int = 2000  # iterations before the seg loss is switched on

    def __init__(self, cfg: Config, classes, backbone, model_cfg) -> None:
        super().__init__(cfg, classes, backbone, model_cfg)
        D = backbone.embed_dim
        self.cam_head = CAMHead(D, classes.num_fg)
        self.aux_head = CAMHead(D, classes.num_fg)
        self.seg_head = LargeFOVHead(D, model_cfg.seg_hidden, classes.K)
        self.aux_layer = model_cfg.aux_layer % backbone.depth

    def _cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(x, layers=(self.aux_layer,))
        return self.cam_head.cam(out.tokens), self.aux_head.cam(out.layers[self.aux_layer])

    def train_step(self, batch: dict, it: int) -> StepOutput:
        """Classification (final + aux), PTC, and after warm-up seg CE on refined pseudo labels."""
        c = self.cfg
        x, tags, valid = batch["image"], batch["tags"], batch["valid"]
        out = self.backbone(x, layers=(self.aux_layer,))
        feat, aux = out.tokens, out.layers[self.aux_layer]
        loss_cls = multilabel_loss(self.cam_head(feat), tags)
        loss_aux = multilabel_loss(self.aux_head(aux), tags)
        cam, aux_cam = multi_scale_cam(self._cams, x, c.cam_scales, c.cam_flip)
        h, w = feat.shape[-2:]
        small_valid = F.interpolate(valid[:, None].float(), size=(h, w), mode="nearest")[:, 0].bool()
        tok_labels = cam_to_label(
            F.interpolate(aux_cam, size=(h, w), mode="bilinear", align_corners=False), tags, self.classes,
            c.high_thre, c.low_thre, valid=small_valid,
        )  # fmt: skip
        loss_ptc = patch_token_contrast(feat, tok_labels, self.classes.ignore_index)
        loss = loss_cls + c.w_aux_cls * loss_aux + c.w_ptc * loss_ptc
        logs = {"cls": loss_cls.detach(), "aux_cls": loss_aux.detach(), "ptc": loss_ptc.detach()}
        if it >= c.seg_warmup and c.w_seg > 0:
            labels = self._refine(cam, x, tags, valid)
            loss_seg = balanced_seg_loss(self.seg_head(feat), labels, self.classes.ignore_index)
            loss = loss + c.w_seg * loss_seg
            logs["seg"] = loss_seg.detach()
        return StepOutput(loss, logs)

    @torch.no_grad()
    def _refine(self, cam, x, tags, valid):
        c = self.cfg
        return refine_pseudo_labels(
            cam, denormalize(x), tags, self.classes, c.high_thre, c.low_thre, c.par_scale, c.par_iters,
            c.par_dilations, valid,
        )  # fmt: skip

    @torch.no_grad()
    def predict_cams(self, images: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-scale flipped final-layer CAMs (B, C, H, W) in [0, 1]."""
        return multi_scale_cam(self._cams, images, self.cfg.cam_scales, self.cfg.cam_flip)[0]

    @torch.no_grad()
    def pseudo_labels(self, images, tags, valid=None) -> torch.Tensor:
        """PAR-refined pseudo labels (B, H, W), exactly as the seg head is trained on."""
        return self._refine(self.predict_cams(images), images, tags, valid)

    def predict_seg(self, images: torch.Tensor) -> torch.Tensor:
        """Seg logits (B, K, H, W)."""
        return upsample(self.seg_head(self.backbone(images).tokens), images.shape[-2:])
