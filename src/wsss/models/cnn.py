"""timm CNN wrapper (ResNet family and other ``features_only`` models) behind the ViT backbone interface.

``forward`` returns the same :class:`~wsss.models.backbone.BackboneOutput` as the ViT: ``feat`` is the
deepest stage's map (B, D, h, w), ``layers`` the requested stages' maps (each at its own resolution and
width, see ``dims``), an empty ``prefix`` (methods then use the mean token where a ViT class token
would go) and no attention maps. Output stride 8 or 16 comes from dilating the last stages (timm's
``output_stride``), as WS-FCN and DeepLab do, so the final grid matches a ViT-B/16 (stride 16) or is
twice as fine (stride 8).

BatchNorm layers stay in eval mode while training (``frozen_bn``): WSSS batches are 2 to 4 crops per
process, too few for batch statistics; their affine parameters still train. There are no block hooks,
so modules that hook into ViT blocks (``cf_bilstm``, ``class_tokens``) refuse a CNN at build time.
timm has no wide ResNet-38 (WS-FCN's main backbone); ``wide_resnet50_2`` / ``wide_resnet101_2`` are
the closest it offers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from wsss.models.backbone import BackboneOutput, create_timm
from wsss.registry import BACKBONES


class CNNBackbone(nn.Module):
    """A timm ``features_only`` CNN as a feature-map encoder.

    Args:
        name: timm model name (e.g. ``resnet50``, ``resnet101``, ``wide_resnet50_2``).
        weights: ``timm`` | ``none`` | path to a local weights file (the classifier's full state dict).
        output_stride: 8 or 16 (dilated last stages) or 32.
        freeze_blocks: freeze the stem and the first N stages.
        frozen_bn: keep BatchNorm statistics fixed while training.
    """

    def __init__(
        self, name: str, weights: str = "timm", output_stride: int = 16, freeze_blocks: int = 0, frozen_bn: bool = True
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"model.output_stride must be 8, 16 or 32 for a CNN backbone, got {output_stride}")
        # All feature levels; the stem's (index 0, stride 2) is dropped in forward and from the lists below.
        self.net: Any  # a timm features_only model: its attributes (feature_info, stages) vary by family
        self.net, self.weights_source = create_timm(name, weights, features_only=True, output_stride=output_stride)
        info = self.net.feature_info
        self.dims: list[int] = list(info.channels())[1:]
        self.strides: list[int] = list(info.reduction())[1:]
        self.depth = len(self.dims)
        self.embed_dim: int = self.dims[-1]
        self.patch_size: int = self.strides[-1]
        self.num_prefix = 0
        self.frozen_bn = frozen_bn
        if freeze_blocks > 0:
            # Stem plus the first N stages: the children of the feature net up to the N-th stage module.
            stages = list(info.module_name())[1 : freeze_blocks + 1]
            for child_name, child in self.net.named_children():
                child.requires_grad_(False)
                if child_name == stages[-1].split(".")[0]:
                    break

    def train(self, mode: bool = True) -> CNNBackbone:
        """Train mode, with BatchNorm layers left in eval mode when ``frozen_bn``."""
        super().train(mode)
        if mode and self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(
        self, x: torch.Tensor, layers: tuple[int, ...] = (), attn_layers: tuple[int, ...] = ()
    ) -> BackboneOutput:
        """Encode images (B, 3, H, W); ``layers`` are stage indices (negatives allowed). CNNs have no
        attention maps: asking for them is an error."""
        if attn_layers:
            raise ValueError("a CNN backbone has no attention maps; a module that needs them needs a ViT")
        feats = self.net(x)[1:]
        want = {i % self.depth for i in layers}
        out_layers = {i: feats[i] for i in want}
        final = feats[-1]
        B, D = final.shape[:2]
        return BackboneOutput(final, out_layers, final.new_zeros(B, 0, D), {}, None)


def is_vit(name: str) -> bool:
    """Whether timm model ``name`` is a ViT (patch tokens) rather than a CNN (feature maps)."""
    import timm

    base = name.split(".")[0]
    try:
        module = timm.models.model_entrypoint(base).__module__.rsplit(".", 1)[-1]
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"model.backbone: unknown timm model '{name}'") from e
    return module in ("vision_transformer", "deit", "eva", "beit", "vision_transformer_relpos")


def resolve_arch(model_cfg) -> str:
    """``model.arch`` with ``auto`` resolved from the timm model's family: ``vit`` or ``cnn``; ConfigError
    for an unknown timm model."""
    from wsss.config import ConfigError

    if model_cfg.arch != "auto":
        return model_cfg.arch
    try:
        return "vit" if is_vit(model_cfg.backbone) else "cnn"
    except ValueError as e:
        raise ConfigError(str(e)) from None


@BACKBONES.register("cnn")
def build_cnn(cfg) -> CNNBackbone:
    """Backbone from a ModelConfig-like object (backbone, weights, output_stride, freeze_blocks)."""
    return CNNBackbone(cfg.backbone, cfg.weights, cfg.output_stride, cfg.freeze_blocks)
