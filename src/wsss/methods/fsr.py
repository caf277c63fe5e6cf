"""``fsr``: progressive feature self-reinforcement (FSR) on the single-stage pipeline, three stackable modules.

Facts from FSR's public code (``Jessie459/feature-self-reinforcement``) and where we differ:

- ``ema_teacher``: a full copy of the network (backbone, heads and every other module, built after all
  of them), no gradient, always in eval mode, updated after each optimizer step by EMA with momentum
  on a cosine schedule from ``momentum`` 0.9995 to ``momentum_end`` 1.0 over ``momentum_iters``; its
  buffers (memory banks) are copied. ``predict_with: teacher`` makes evaluation and prediction use the
  teacher, as FSR does (default: the student). It is a buffer-and-parameter subtree of the method, so it is saved
  and resumed with it; its parameters never reach the optimizer or DDP's gradient sync. The module
  also cuts the second view on the device (:func:`wsss.data.views.random_resized_view`: FSR's
  RandomResizedCrop(0.32-1) + flip + colour jitter, taken from the training crop instead of the source
  image, and without hue jitter), and owns the aggregation token (2 class-attention blocks over the
  final patch tokens) and the DINO head (to ``out_dim`` 4096) with the two centred distillation targets.
- ``uncertain_masking`` (needs ``ema_teacher``, a ViT): the auxiliary CAM of the training crop, which
  the pipeline has already computed at several scales, is *warped* into the second view (roi_align with
  the view's box and flip) instead of running six more CAM passes on it as the official code does.
  Max over present classes; uncertain where ``low`` < value < ``high`` (0.2, 0.7); blocks of ``block``
  x ``block`` tokens (FSR: 4, i.e. 64 px) sampled at their corner; ``ceil(ratio * blocks)`` blocks (0.4)
  masked, uncertain blocks first (uniform noise + 1), random fill; purely random before
  ``random_iters``. Masked patch embeddings are replaced by a learnable mask token before the position
  embedding. Loss ``fsr_patch``: distillation (see :class:`wsss.losses.distill.CenteredDistill`) from
  the teacher's tokens of the *unmasked* second view to the student's tokens of the masked one, on
  masked tokens only (the head runs only on those), mean per image, then over the batch.
- ``self_enhancement`` (needs ``ema_teacher``): ``fsr_class``: distillation from the teacher's
  aggregated token of the training crop to the student's aggregated token of the masked second view
  (when masking is on; the unmasked view otherwise), whose visible tokens are the confident regions.

Losses are logged as KL (0 when student and teacher agree) rather than FSR's cross-entropy: the same
gradient, minus the teacher's constant entropy.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn as nn

from wsss.config import ConfigError
from wsss.data.views import random_resized_view
from wsss.losses.distill import CenteredDistill
from wsss.methods.pipeline import PipelineModule, StepState
from wsss.methods.regions import tokens
from wsss.methods.toco import ToCo
from wsss.models.blocks.dino import AggregationToken
from wsss.models.heads import ProjectionHead
from wsss.registry import METHODS, MODULES


def uncertainty_block_mask(
    cam: torch.Tensor, tags: torch.Tensor, block: int, ratio: float, low: float, high: float, guided: bool,
    gen: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Token mask (B, h, w) bool from CAMs (B, C, h, w) on the token grid: ``ceil(ratio * blocks)`` blocks of
    ``block`` x ``block`` tokens, uncertain ones first when ``guided`` (see the module docstring)."""
    B, _, h, w = cam.shape
    nh, nw = math.ceil(h / block), math.ceil(w / block)
    v = (cam * tags[:, :, None, None]).amax(1, keepdim=True)
    unc = ((v > low) & (v < high)).float()
    corner = unc[:, :, ::block, ::block][:, 0].flatten(1)  # (B, nh * nw): each block's top-left token
    n = math.ceil(nh * nw * ratio)
    score = torch.rand(B, nh * nw, generator=gen, device=cam.device) + (corner if guided else 0)
    chosen = torch.zeros(B, nh * nw, dtype=torch.bool, device=cam.device)
    chosen.scatter_(1, score.topk(n, dim=1).indices, True)
    grid = chosen.view(B, nh, nw).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return grid[:, :h, :w]


def _mask_hook(token: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Patch embeddings (B, h, w, D) with the masked positions replaced by ``token`` (1, D)."""
    return torch.where(mask[..., None], token.to(t.dtype), t)


@MODULES.register("ema_teacher")
class EMATeacher(PipelineModule):
    """FSR's EMA teacher of the whole network, second view, aggregation token and DINO head."""

    uses = "an EMA teacher: a full copy of the network (checkpointed)"

    @dataclass(frozen=True)
    class Config:
        """Teacher momentum schedule, head sizes, distillation temperatures, second-view augmentation."""

        momentum: float = 0.9995
        momentum_end: float = 1.0
        momentum_iters: int = 20000  # cosine horizon (FSR: the whole run); 0: constant momentum
        out_dim: int = 4096
        hidden: int = 2048
        bottleneck: int = 256
        agg_depth: int = 2  # class-attention blocks of the aggregation token
        student_temp: float = 0.1
        teacher_temp: float = 0.04
        teacher_temp_end: float = 0.07
        teacher_temp_iters: int = 2500  # linear warm-up of the teacher temperature (FSR: max_iters / 8)
        center_momentum: float = 0.9
        view_scale: tuple[float, float] = (0.32, 1.0)
        view_jitter: float = 0.4
        predict_with: str = "student"  # student | teacher: the network evaluation and `wsss predict` use

    def __init__(self, cfg: Config, host) -> None:
        super().__init__(cfg, host)
        if cfg.predict_with not in ("student", "teacher"):
            raise ConfigError(f"method.ema_teacher.predict_with must be student or teacher, got '{cfg.predict_with}'")
        bb = host.backbone
        D = bb.embed_dim
        heads = getattr(bb, "num_heads", 0) or max(1, D // 64)
        self.agg = AggregationToken(D, heads, cfg.agg_depth)
        self.head = ProjectionHead(D, cfg.out_dim, cfg.hidden, cfg.bottleneck, last_init="trunc_normal")
        kw: dict[str, Any] = dict(student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp,
                                  teacher_temp_end=cfg.teacher_temp_end, warmup=cfg.teacher_temp_iters,
                                  center_momentum=cfg.center_momentum)  # fmt: skip
        self.distill_patch, self.distill_cls = CenteredDistill(cfg.out_dim, **kw), CenteredDistill(cfg.out_dim, **kw)
        self._host = [host]  # a list: the host is not registered as a child (no cycle)
        self.teacher: ToCo | None = None  # the host's deep copy, set in finalize
        # (teacher, student) parameter pairs and buffer pairs, built at the first EMA update
        self._pairs: tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]] | None
        self._pairs = None

    def finalize(self, host) -> None:
        """Copy the finished network (all other modules included) as the teacher."""
        teacher = copy.deepcopy(host)  # self.teacher is None here: the copy holds no teacher of its own
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        self.teacher_views = sorted({v for m in host.mods.values() for v in getattr(m, "teacher_views", ())})

    def predictor(self):
        """The teacher when ``predict_with: teacher`` (FSR evaluates and ships its teacher)."""
        return self.teacher if self.cfg.predict_with == "teacher" else None

    def train(self, mode: bool = True) -> EMATeacher:
        """Train mode for the student parts; the teacher stays in eval mode (no drop-path)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def momentum_at(self, it: int) -> float:
        """EMA momentum after step ``it``: cosine from ``momentum`` to ``momentum_end``."""
        c = self.cfg
        if c.momentum_iters <= 0:
            return c.momentum
        k = min(it, c.momentum_iters) / c.momentum_iters
        return c.momentum_end + 0.5 * (c.momentum - c.momentum_end) * (1 + math.cos(math.pi * k))

    def extend(self, state: StepState) -> None:
        """``state.view``: the second view (a :class:`wsss.data.views.View`)."""
        c = self.cfg
        state.view = random_resized_view(state.x, state.gen, c.view_scale, jitter=c.view_jitter)

    def outputs(self, state: StepState) -> dict[str, torch.Tensor]:
        """Student map of the (masked) second view; teacher maps of the views the modules ask for. Cached."""
        if state.teacher_out is not None:
            return state.teacher_out
        host, view = self._host[0], state.view
        res = {"student": host.encode(view.image, attn=False, embed_hook=state.embed_hook).feat}
        views = {1: state.x, 2: view.image}
        if self.teacher_views:
            with torch.no_grad():
                t = cast(ToCo, self.teacher).encode(torch.cat([views[v] for v in self.teacher_views]), attn=False).feat
            for v, part in zip(self.teacher_views, t.chunk(len(self.teacher_views))):
                res[f"teacher{v}"] = part
        state.teacher_out = res
        return res

    def teacher_parts(self) -> EMATeacher:
        """The teacher's copy of this module (its aggregation token and head)."""
        return cast(
            EMATeacher, cast(ToCo, self.teacher).mods[next(n for n, m in self._host[0].mods.items() if m is self)]
        )

    @torch.no_grad()
    def on_step_end(self, it: int) -> None:
        """EMA of every student parameter into the teacher; buffers copied; distillation centres updated."""
        if self._pairs is None:
            student = dict(self._host[0].named_parameters())
            pairs: list[tuple[torch.Tensor, torch.Tensor]] = [
                (p, student[n]) for n, p in cast(ToCo, self.teacher).named_parameters()
            ]
            sb = dict(self._host[0].named_buffers())
            self._pairs = (pairs, [(b, sb[n]) for n, b in cast(ToCo, self.teacher).named_buffers()])
        pairs, buffers = self._pairs
        w = 1.0 - self.momentum_at(it)
        if w > 0:
            torch._foreach_lerp_([t for t, _ in pairs], [s.detach() for _, s in pairs], w)
        for t, s in buffers:
            t.copy_(s)
        self.distill_patch.update_center()
        self.distill_cls.update_center()


@MODULES.register("uncertain_masking")
class UncertainMasking(PipelineModule):
    """Mask the uncertain tokens of the second view; the student recovers the teacher's features there."""

    vit_only = True
    loss_names = ("fsr_patch",)
    warmup_key = "random_iters"
    uses = "the teacher; ViT patch embeddings"

    needs = ("ema_teacher",)
    teacher_views = (2,)

    @dataclass(frozen=True)
    class Config:
        """Loss weight, mask blocks and ratio, uncertainty band, random phase."""

        renamed_keys: ClassVar[dict[str, str]] = {"low": "low_thre", "high": "high_thre"}

        w: float = 0.1
        block: int = 4  # tokens per block side (FSR: 4 = 64 px at patch 16)
        ratio: float = 0.4
        low_thre: float = 0.2
        high_thre: float = 0.7
        random_iters: int = 4000  # purely random masking before this iteration (FSR: max_iters / 5)

    def __init__(self, cfg: Config, host) -> None:
        super().__init__(cfg, host)
        self.mask_token = nn.Parameter(torch.zeros(1, host.backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def attach(self, backbone) -> None:
        """Token masking happens before the position embedding: only a ViT has that hook."""
        if "embed_hook" not in inspect.signature(backbone.forward).parameters:
            raise ConfigError(f"method.modules: uncertain_masking masks ViT patch embeddings; "
                              f"{type(backbone).__name__} has none")  # fmt: skip

    def extend(self, state: StepState) -> None:
        """``state.view_mask`` (B, h, w) for the second view, and ``state.embed_hook`` that applies it."""
        c = self.cfg
        h, w = state.feat.shape[-2:]
        cam2 = state.view.warp(state.aux_cam.float(), (h, w))
        mask = uncertainty_block_mask(cam2, state.tags, c.block, c.ratio, c.low_thre, c.high_thre,
                                      state.it >= c.random_iters, state.gen)  # fmt: skip
        state.view_mask = mask
        state.embed_hook = functools.partial(_mask_hook, self.mask_token, mask)

    def losses(self, state: StepState) -> dict[str, tuple[float, torch.Tensor]]:
        """``fsr_patch``: teacher (unmasked view) -> student (masked view) on the masked tokens."""
        if self.cfg.w <= 0:
            return {}
        ema = cast(EMATeacher, self.deps["ema_teacher"])
        out, mask = ema.outputs(state), cast(torch.Tensor, state.view_mask)  # set by this module's extend
        m = mask.flatten(1)  # (B, N)
        s = ema.head(tokens(out["student"])[m])
        with torch.no_grad():
            t_all = ema.teacher_parts().head(tokens(out["teacher2"]).flatten(0, 1))  # (B*N, K)
        # the centre follows every patch token of the view, as FSR's code does; the loss, the masked ones
        kl = ema.distill_patch(t_all[m.flatten()], s, state.it, center_rows=t_all)  # (M,)
        b = m.nonzero()[:, 0]
        per_img = torch.zeros(m.shape[0], device=kl.device).index_add(0, b, kl) / m.sum(1).clamp(min=1)
        return {"fsr_patch": (self.cfg.w, per_img.mean())}


@MODULES.register("self_enhancement")
class SelfEnhancement(PipelineModule):
    """Keep the (masked) second view's aggregated token consistent with the teacher's of the training crop."""

    loss_names = ("fsr_class",)
    uses = "the teacher"

    needs = ("ema_teacher",)
    teacher_views = (1,)

    @dataclass(frozen=True)
    class Config:
        """Loss weight."""

        w: float = 0.1

    def losses(self, state: StepState) -> dict[str, tuple[float, torch.Tensor]]:
        """``fsr_class``: teacher aggregated token of view 1 -> student aggregated token of view 2."""
        if self.cfg.w <= 0:
            return {}
        ema = cast(EMATeacher, self.deps["ema_teacher"])
        out = ema.outputs(state)
        s = ema.head(ema.agg(out["student"]))
        with torch.no_grad():
            tp = ema.teacher_parts()
            t = tp.head(tp.agg(out["teacher1"]))
        return {"fsr_class": (self.cfg.w, ema.distill_cls(t, s, state.it).mean())}


@METHODS.register("fsr")
class FSR(ToCo):
    """FSR: the single-stage pipeline with the EMA teacher, uncertain-region masking and self-enhancement."""

    @dataclass(frozen=True)
    class Config(ToCo.Config):
        """ToCo's settings without the class-token contrast (FSR does not use it); the three FSR modules."""

        w_ctc: float = 0.0
        modules: tuple[str, ...] = ("ema_teacher", "uncertain_masking", "self_enhancement")
