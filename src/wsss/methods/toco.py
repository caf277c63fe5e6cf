"""``toco``: the single-stage baseline (ToCo, CVPR 2023) every other method builds on.

ViT patch tokens -> CAM head (global max pooling + 1x1 conv) and an auxiliary CAM head on block
``model.aux_layer``; multi-scale flipped CAMs -> PAR-refined pseudo labels (high/low thresholds,
ignore band) -> LargeFOV seg head trained after ``seg_warmup`` iterations; patch token contrast
(PTC) on token labels from the auxiliary CAM.

Same losses and settings as the official code, computed with less work:

- the no-grad CAM passes run only the backbone and the CAM heads, never the seg head;
- forwards that run with gradient anyway double as CAM passes (detached): the training crop is the
  unflipped scale-1 pass, and the CTC's second global view (the flipped crop, at
  ``ctc_global_scale``) is the flipped pass at that scale; each remaining scale runs the image and
  its flip as one batch;
- the official CTC runs its global views through the encoder twice (a detached "teacher" pass of the
  same encoder, then the student pass); one pass gives both here, and the training crop and the second
  view go through it as one batch when they have the same size; all local crops of the batch are cut
  by one ``roi_align``;
- PAR propagates only each image's present classes, and is skipped while the seg loss is off.

The CTC's second global view: by default the flipped training crop (``ctc_view: flip``, reused as a
CAM pass); ``ctc_view: random`` cuts it as the official code does, a random resized crop with flip
and colour jitter (no blur or solarisation), at one more forward.
The dense-CRF energy regulariser (``w_reg``) runs at half size on a permutohedral lattice in plain torch,
as the official C++ one does (see ``wsss.losses.energy``).

Class-token contrast (CTC): two global views (the training crop, and the second view at ``ctc_global_scale``)
and ``ctc_local_crops`` local crops from non-confident regions go through the backbone; their class
tokens are projected (student projector, and an EMA teacher projector for the global views) and
contrasted (see ``wsss.losses.class_token_contrast``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TypedDict

import torch
import torch.nn.functional as F

from wsss.cam.cam import multi_scale_cam
from wsss.cam.labels import cam_to_label, refine_pseudo_labels
from wsss.config import ConfigError
from wsss.data.transforms import denormalize
from wsss.data.views import random_resized_view
from wsss.losses.class_token_contrast import class_token_contrast, roi_from_cam, sample_local_crops
from wsss.losses.classification import multilabel_loss
from wsss.losses.energy import dense_energy_loss
from wsss.losses.segmentation import balanced_seg_loss, seg_loss
from wsss.losses.token_contrast import patch_token_contrast
from wsss.methods.base import Method, StepOutput, sample_generator, upsample
from wsss.methods.pipeline import SEG_FEATURES, ModuleHost, StepState
from wsss.models.backbone import split_output
from wsss.models.heads import CAMHead, LargeFOVHead, ProjectionHead
from wsss.registry import METHODS


class _View2Kwargs(TypedDict):
    """Keyword arguments of :func:`wsss.data.views.random_resized_view` that TOCO_VIEW2 sets."""

    scale: tuple[float, float]
    p_jitter: float
    p_gray: float
    p_blur: float
    p_solarize: float


# ToCo's second global view (its datasets/voc.py): crop area, jitter, grey, blur, solarisation.
TOCO_VIEW2: _View2Kwargs = {"scale": (0.4, 1.0), "p_jitter": 0.8, "p_gray": 0.2, "p_blur": 0.1, "p_solarize": 0.2}


@METHODS.register("toco")
class ToCo(ModuleHost, Method):
    """Single-stage WSSS baseline; see the module docstring."""

    @dataclass(frozen=True)
    class Config:
        """ToCo hyper-parameters (VOC defaults)."""

        high_thre: float = 0.7
        low_thre: float = 0.25
        cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
        cam_flip: bool = True
        par_iters: int = 10
        par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
        par_scale: float = 0.5
        w_aux_cls: float = 1.0
        w_ptc: float = 0.2
        w_seg: float = 0.1
        seg_warmup: int = 2000  # iterations before the seg loss is switched on
        # ToCo's seg CE: background and foreground pixels averaged apart, then halved (each side weighs the
        # same whatever its pixel count); False: one CE over all labelled pixels
        seg_balanced: bool = True
        w_reg: float = 0.05  # dense-CRF energy regulariser on the seg head (after seg_warmup); 0: off
        # crop side the energy constants are rescaled from (448: the official strength at any crop; see
        # wsss.losses.energy); 0: the official constants as given, which is what the demo measured better
        reg_ref_side: float = 0.0
        w_ctc: float = 0.5  # 0 switches the class-token contrast off
        ctc_temp: float = 0.125  # of cosine similarities: the official 0.5 at its initial output scale (see the loss)
        ctc_cosine: bool = True  # False: the official raw dot product, whose scale grows unbounded
        ctc_momentum: float = 0.9  # EMA of the teacher projector
        ctc_local_crops: int = 8
        ctc_local_size: int = 96
        ctc_global_scale: float = 1.0  # second global view: the flipped crop at this scale
        # flip: the flipped crop (doubles as a CAM pass); random: as the official code, an independent random
        # resized crop (area 0.4-1) with flip, colour jitter (p 0.8), grey, blur and solarisation (one more forward)
        ctc_view: str = "flip"
        ctc_neg_ratio: float = 0.2
        ctc_out_dim: int = 1024
        contrast_start: int = 0  # iterations before PTC and CTC switch on (ToCo's COCO recipe: 12000)
        aux_labels_until: int = 0  # seg pseudo labels from the auxiliary CAM before this (ToCo's COCO: 12000)
        # image logits of the CAM head: gmp (ToCo: classify the global max of the features) or topk (mean of
        # each class's top cls_topk fraction of patch logits; the pooling CPF-CTE is described with)
        cls_pool: str = "gmp"
        cls_topk: float = 0.1
        # pipeline modules stacked on this recipe, in order (see wsss.methods.pipeline; `wsss list modules`)
        modules: tuple[str, ...] = ()

    def __init__(self, cfg: Config, classes, backbone, model_cfg) -> None:
        super().__init__(cfg, classes, backbone, model_cfg)
        D = backbone.embed_dim
        try:
            self.cam_head = CAMHead(D, classes.num_fg, cfg.cls_pool, cfg.cls_topk)
        except ValueError as e:
            raise ConfigError(f"method.cls_pool / method.cls_topk: {e}") from None
        self.aux_layer = model_cfg.aux_layer % backbone.depth
        self.aux_head = CAMHead(backbone.dims[self.aux_layer], classes.num_fg)
        self.seg_head = LargeFOVHead(D, model_cfg.seg_hidden, classes.K)
        if cfg.ctc_view not in ("flip", "random"):
            raise ConfigError(f"config key method.ctc_view must be flip or random, got '{cfg.ctc_view}'")
        if cfg.w_ctc > 0:
            self.proj = ProjectionHead(D, cfg.ctc_out_dim)
            self.proj_t = copy.deepcopy(self.proj).requires_grad_(False)
        self.init_modules((self.aux_layer,))

    def _cams_of_output(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (CAM, aux CAM) (B, C, h, w) of one backbone output; modules may refine the CAM."""
        return self.fuse_cams(self.cam_head.cam(out.feat), out), self.aux_head.cam(out.layers[self.aux_layer])

    def _class_token(self, out) -> torch.Tensor:
        # Backbones without a class token use the mean patch token.
        return out.prefix[:, 0] if out.prefix.shape[1] else out.feat.mean((2, 3))

    def _ctc(self, x, glob, aux_cam, tags, gen) -> torch.Tensor:
        c = self.cfg
        B = x.shape[0]
        roi = roi_from_cam(aux_cam, tags, c.high_thre, c.low_thre)
        crops, flags, _ = sample_local_crops(x, roi, c.ctc_local_crops, c.ctc_local_size, c.ctc_neg_ratio, gen)
        local = self._class_token(self.backbone(crops)).view(B, c.ctc_local_crops, -1)
        student = self.proj(torch.cat([glob, local], 1).flatten(0, 1)).view(B, 2 + c.ctc_local_crops, -1)
        teacher = self.proj_t(glob.detach().flatten(0, 1)).view(B, 2, -1)
        all_flags = torch.cat([torch.ones_like(flags[:, :2]), flags], 1)
        return class_token_contrast(teacher, student, all_flags, c.ctc_temp, c.ctc_cosine)

    @torch.no_grad()
    def on_step_end(self, it: int) -> None:
        """EMA update of the CTC teacher projector; then each module's own step-end work."""
        if self.cfg.w_ctc > 0:
            m = self.cfg.ctc_momentum
            for pt, ps in zip(self.proj_t.parameters(), self.proj.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        self.modules_step_end(it)

    def _cams_of_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (CAM, aux CAM) (B, C, h, w) of images x (B, 3, H, W): one backbone pass (what
        :func:`~wsss.cam.cam.multi_scale_cam` calls at each scale)."""
        return self._cams_of_output(self.encode(x))

    def train_step(self, batch: dict, it: int) -> StepOutput:
        """Classification (final + aux), PTC and CTC (from ``contrast_start``), and after ``seg_warmup`` seg
        CE on the refined pseudo labels (of the auxiliary CAM before ``aux_labels_until``) plus the energy
        regulariser; each loss is logged by name."""
        c = self.cfg
        x, tags, valid = batch["image"], batch["tags"], batch["valid"]
        B = x.shape[0]
        self.begin_step(batch, it)
        if c.w_ctc > 0:
            s2 = c.ctc_global_scale
            if c.ctc_view == "random":
                gen2 = sample_generator(batch, it, x.device, stream=1)
                x2 = random_resized_view(x, gen2, **TOCO_VIEW2).image
            else:
                x2 = x.flip(-1)
            x2 = x2 if s2 == 1.0 else F.interpolate(x2, scale_factor=s2, mode="bilinear")
            if x2.shape == x.shape:  # both global views in one pass
                out, out2 = split_output(self.encode(torch.cat([x, x2])), B)
            else:
                out, out2 = self.encode(x), self.encode(x2)
        else:
            out = self.encode(x)
        feat, aux = out.feat, out.layers[self.aux_layer]
        logits = self.cam_head(feat)
        loss_cls = multilabel_loss(logits, tags)
        loss_aux = multilabel_loss(self.aux_head(aux), tags)
        # Forwards with gradient double as the unflipped CAM passes at their scales (detached there).
        base: dict[float, tuple[torch.Tensor, ...]]
        base_flip: dict[float, tuple[torch.Tensor, ...]]
        base, base_flip = {1.0: self._cams_of_output(out)}, {}
        if c.w_ctc > 0:
            if c.ctc_view == "flip":
                base_flip[s2] = self._cams_of_output(out2)
            glob = torch.stack([self._class_token(out), self._class_token(out2)], 1)  # (B, 2 views, D)
        cam, aux_cam = multi_scale_cam(self._cams_of_image, x, c.cam_scales, c.cam_flip, base=base, base_flip=base_flip)
        h, w = feat.shape[-2:]
        small_valid = F.interpolate(valid[:, None].float(), size=(h, w), mode="nearest")[:, 0].bool()
        tok_labels = cam_to_label(
            F.interpolate(aux_cam, size=(h, w), mode="bilinear", align_corners=False), tags, self.classes,
            c.high_thre, c.low_thre, valid=small_valid,
        )  # fmt: skip
        loss = loss_cls + c.w_aux_cls * loss_aux
        logs: dict[str, torch.Tensor | float] = {"cls": loss_cls.detach(), "aux_cls": loss_aux.detach()}
        contrast = it >= c.contrast_start
        if contrast:
            loss_ptc = patch_token_contrast(feat, tok_labels, self.classes.ignore_index)
            loss = loss + c.w_ptc * loss_ptc
            logs["ptc"] = loss_ptc.detach()
        if c.w_ctc > 0 and contrast:
            loss_ctc = self._ctc(x, glob, aux_cam, tags, sample_generator(batch, it, x.device))
            loss = loss + c.w_ctc * loss_ctc
            logs["ctc"] = loss_ctc.detach()
        if self.mods:
            gen = sample_generator(batch, it, x.device)
            state = StepState(x, tags, valid, out, feat, logits, cam, aux_cam, tok_labels, small_valid, it, gen)
            loss = self.add_module_losses(state, loss, logs)
        if it >= c.seg_warmup and c.w_seg > 0:
            rgb = denormalize(x)  # (B, 3, H, W) in [0, 1] for PAR and the energy term: once per step
            labels = self._par_pseudo_labels(aux_cam if it < c.aux_labels_until else cam, x, rgb, tags, valid)
            seg = upsample(self.seg_head(out.maps.get(SEG_FEATURES, feat)), labels.shape[-2:])
            seg_ce = balanced_seg_loss if c.seg_balanced else seg_loss
            loss_seg = seg_ce(seg, labels, self.classes.ignore_index)
            loss = loss + c.w_seg * loss_seg
            logs["seg"] = loss_seg.detach()
            if c.w_reg > 0:
                loss_reg = dense_energy_loss(
                    seg.softmax(1),
                    rgb * 255,
                    labels,
                    valid,
                    ignore_index=self.classes.ignore_index,
                    ref_side=c.reg_ref_side,
                )
                loss = loss + c.w_reg * loss_reg
                logs["reg"] = loss_reg.detach()
        return StepOutput(loss, logs)

    @torch.no_grad()
    def _par_pseudo_labels(self, cam, x, rgb, tags, valid):
        """Pseudo labels (B, H, W) (255: uncertain) of CAMs (B, C, H, W) by the two thresholds, refined by PAR on
        ``rgb`` (B, 3, H, W) in [0, 1] (the normalised images ``x``, denormalised), then by the modules."""
        c = self.cfg
        labels = refine_pseudo_labels(
            cam, rgb, tags, self.classes, c.high_thre, c.low_thre, c.par_scale, c.par_iters,
            c.par_dilations, valid,
        )  # fmt: skip
        return self.refine_labels(labels, cam, x, tags, valid)

    @torch.no_grad()
    def predict_cams(self, images: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-scale flipped final-layer CAMs (B, C, H, W) in [0, 1] (of the network a module may name for
        inference, e.g. FSR's teacher)."""
        net = self.predictor()
        return multi_scale_cam(net._cams_of_image, images, self.cfg.cam_scales, self.cfg.cam_flip)[0]

    @torch.no_grad()
    def pseudo_labels(self, images, tags, valid=None, cams=None) -> torch.Tensor:
        """PAR-refined pseudo labels (B, H, W), exactly as the seg head is trained on."""
        cams = self.predict_cams(images) if cams is None else cams
        return self._par_pseudo_labels(cams, images, denormalize(images), tags, valid)

    @torch.no_grad()
    def predict_tags(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, C) of the CAM head's image classifier (the one trained on the tags)."""
        net = self.predictor()
        return torch.sigmoid(net.cam_head(net.encode(images, attn=False).feat).float())

    def predict_seg(self, images: torch.Tensor) -> torch.Tensor:
        """Seg logits (B, K, H, W)."""
        net = self.predictor()
        out = net.encode(images, attn=False)
        return upsample(net.seg_head(out.maps.get(SEG_FEATURES, out.feat)), images.shape[-2:])
