"""``wsfcn``: WS-FCN's context aggregation and feature fusion (arXiv 2304.09059) on the single-stage pipeline.

WS-FCN trains single-stage on Araslanov and Roth's recipe with CNN backbones; here its two modules
run on the project's shared single-stage recipe (ToCo's CAMs, PAR pseudo labels and seg head), on a
CNN (``model.backbone: resnet101``, output stride 8 or 16, see :mod:`wsss.models.cnn`) or a ViT:

- ``context_aggregation`` (``mode: fca``, the default): :class:`~wsss.models.blocks.context.FlexibleContext`,
  WS-FCN's FCA operator as its code: four branches of separable dilated kernels (1, 3, 5, 7 at
  dilations 1, 12, 24, 36 on a stride-8 map, scaled to the backbone's stride: 1, 6, 12, 18 at 16), a
  shared channel attention, a global-pooling branch, a 1x1 fusion, residual spatial attention and
  dropout 0.5, added to the final map through a per-channel gate (ours: the official output replaces
  the features). ``mode: pool``: :class:`~wsss.models.blocks.context.ContextAggregation`, our
  pooled-grid variant (grids 1, 2, 3, 6), the one measured on the bench so far.
- ``feature_fusion`` (``mode: flow``, the default): :class:`~wsss.models.blocks.context.FlowAlignedFusion`
  as WS-FCN's code: the final map is warped up to the grid of the low-level map of ``layers`` by a
  learned flow field and fused with it by an elementwise product with residuals; the result, on the
  low-level grid, is what the seg head reads (``maps[SEG_FEATURES]``: the upsampled final map plus a
  per-channel gate times the fusion), so masks are predicted at the low-level stride (a CNN's stage 0:
  stride 4, as WS-FCN). The CAM heads and the token losses stay on the final grid: the pipeline's PTC
  compares every pair of tokens, which at stride 4 would cost 16 times the tokens squared. A ViT has no
  map finer than its patch grid: an early block stands in (block 3 in the recipes), which adds early
  detail but no resolution. No stochastic gate. ``mode: pool``: the earlier
  :class:`~wsss.models.blocks.context.SemanticFusion`, low-level maps pooled down to the final grid and
  added to the final map for every head.

Both gates start at 0 (``gate_init``): training starts from the unchanged pipeline (with ``mode: flow``
the seg head then reads the bilinearly upsampled final map). Every later head sees the refined map,
at training and at inference. Modules apply in the order of ``method.modules``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from wsss.config import ConfigError
from wsss.methods.base import upsample
from wsss.methods.pipeline import SEG_FEATURES, PipelineModule
from wsss.methods.toco import ToCo
from wsss.models.blocks.context import (
    ContextAggregation,
    FlexibleContext,
    FlowAlignedFusion,
    SemanticFusion,
    fca_dilations,
)
from wsss.registry import METHODS, MODULES


@MODULES.register("context_aggregation")
class ContextAggregationModule(PipelineModule):
    """WS-FCN's flexible context aggregation on the final feature map."""

    block: FlexibleContext | ContextAggregation  # by ``mode``: fca | pool

    @dataclass(frozen=True)
    class Config:
        """Operator (``fca``: WS-FCN's, ``pool``: pooled grids), its shape, branch width, gate start."""

        mode: str = "fca"
        kernels: tuple[int, ...] = (1, 3, 5, 7)  # fca: odd kernel length per branch
        dilations: tuple[int, ...] = ()  # fca: one per kernel; empty: 1, 12, 24, 36 scaled to the grid's stride
        dropout: float = 0.5  # fca
        grids: tuple[int, ...] = (1, 2, 3, 6)  # pool: pooled grid sizes
        hidden: int = 0  # channels per branch; 0: D / 4
        gate_init: float = 0.0

    def __init__(self, cfg: Config, host) -> None:
        super().__init__(cfg, host)
        self._host = [host]  # a list: the host is not registered as a submodule
        bb = host.backbone
        D = bb.embed_dim
        hidden = cfg.hidden or max(D // 4, 1)
        if cfg.mode == "fca":
            dil = tuple(cfg.dilations) or fca_dilations(bb.patch_size)[: len(cfg.kernels)]
            if len(dil) != len(cfg.kernels) or any(k % 2 != 1 or k < 1 for k in cfg.kernels) or min(dil) < 1:
                raise ConfigError(
                    f"method.context_aggregation: kernels {list(cfg.kernels)} must be odd and have one "
                    f"dilation >= 1 each, got dilations {list(dil)}"
                )
            self.dilations = dil
            self.block = FlexibleContext(D, hidden, tuple(cfg.kernels), dil, cfg.dropout, cfg.gate_init)
        elif cfg.mode == "pool":
            self.block = ContextAggregation(D, cfg.grids, hidden, cfg.gate_init)
        else:
            raise ConfigError(f"config key method.context_aggregation.mode must be fca or pool, got '{cfg.mode}'")

    def refine_features(self, out) -> None:
        """feat (B, D, h, w) <- feat + gate * context."""
        if isinstance(self.block, FlexibleContext):
            out.feat = self.block(out.feat, getattr(self._host[0], "step_gen", None))
        else:
            out.feat = self.block(out.feat)


@MODULES.register("feature_fusion")
class FeatureFusionModule(PipelineModule):
    """WS-FCN's semantically consistent bottom-up fusion of a low-level map with the final map."""

    uses = "low-level maps of backbone layers"

    block: FlowAlignedFusion | SemanticFusion  # by ``mode``: flow | pool

    @dataclass(frozen=True)
    class Config:
        """Low-level layers (backbone block / stage indices), fusion mode, projection width, gate start."""

        layers: tuple[int, ...] = (1,)  # CNN: a stage (0: stride 4, 1: stride 8); ViT: an early block, e.g. 3
        # flow: WS-FCN's flow-aligned product fusion on the low-level grid, for the seg head (one layer);
        # pool: the low-level maps pooled down to the final grid and added to it, for every head
        mode: str = "flow"
        hidden: int = 0  # 0: D / 4
        gate_init: float = 0.0

    def __init__(self, cfg: Config, host) -> None:
        super().__init__(cfg, host)
        bb = host.backbone
        if cfg.mode not in ("flow", "pool"):
            raise ConfigError(f"config key method.feature_fusion.mode must be flow or pool, got '{cfg.mode}'")
        if cfg.mode == "flow" and len(cfg.layers) != 1:
            raise ConfigError(
                f"method.feature_fusion: mode flow fuses one low-level layer, got layers {list(cfg.layers)}"
            )
        self.layers = tuple(i % bb.depth for i in cfg.layers)
        D = bb.embed_dim
        hidden = cfg.hidden or max(D // 4, 1)
        if cfg.mode == "flow":
            self.block = FlowAlignedFusion(bb.dims[self.layers[0]], D, hidden)
            self.gate = nn.Parameter(torch.full((D,), float(cfg.gate_init)))
        else:
            self.block = SemanticFusion([bb.dims[i] for i in self.layers], D, hidden, cfg.gate_init)

    def refine_features(self, out) -> None:
        """flow: ``maps[SEG_FEATURES]`` (B, D, H, W) on the low-level grid, the upsampled final map plus
        gate * fusion; pool: feat <- feat + a * sigmoid(semantics) * projected low-level detail."""
        if self.cfg.mode == "pool":
            out.feat = self.block(out.feat, [out.layers[i] for i in self.layers])
            return
        high, low = out.feat, out.layers[self.layers[0]]
        fine = upsample(high, low.shape[-2:])
        out.maps[SEG_FEATURES] = fine + self.gate.to(high.dtype)[:, None, None] * self.block(high, low)


@METHODS.register("wsfcn")
class WSFCN(ToCo):
    """WS-FCN: the single-stage pipeline with context aggregation and semantic feature fusion on."""

    @dataclass(frozen=True)
    class Config(ToCo.Config):
        """ToCo's settings; ``modules`` defaults to both WS-FCN modules."""

        modules: tuple[str, ...] = ("context_aggregation", "feature_fusion")
