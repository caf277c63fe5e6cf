"""Heads shared by the methods: CAM/classifier head, segmentation heads, projection and MLP heads."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class CAMHead(nn.Module):
    """1x1 conv classifier without bias; its weights turn a feature map into class activation maps.

    Image logits come from one of two poolings: ``gmp`` (ToCo's) classifies the global max of the
    features, ``conv(max_p f_p)``; ``topk`` classifies every patch and averages each class's
    ``ceil(topk * h * w)`` highest patch logits (the Top-K pooling CPF-CTE's patch classifier is
    described with), so the image score is carried by a region, not by one channel-wise maximum.

    Args:
        dim: feature channels D.
        num_fg: foreground classes C.
        pool: ``gmp`` or ``topk``.
        topk: fraction of the h*w patches averaged per class under ``topk`` (in (0, 1]).
    """

    def __init__(self, dim: int, num_fg: int, pool: str = "gmp", topk: float = 0.1) -> None:
        super().__init__()
        if pool not in ("gmp", "topk") or not 0 < topk <= 1:
            raise ValueError(f"CAM head pooling must be gmp or topk with a fraction in (0, 1], got {pool}, {topk}")
        self.conv = nn.Conv2d(dim, num_fg, 1, bias=False)
        self.pool, self.topk = pool, float(topk)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """Image logits (B, C) from ``feat`` (B, D, h, w)."""
        if self.pool == "gmp":
            return self.conv(feat.amax(dim=(2, 3), keepdim=True)).flatten(1)
        logits = self.conv(feat).flatten(2)  # (B, C, h*w)
        k = max(1, math.ceil(self.topk * logits.shape[-1] - 1e-9))
        return logits.topk(k, dim=-1).values.mean(-1)

    def cam(self, feat: torch.Tensor) -> torch.Tensor:
        """Raw CAMs relu(conv(feat)): (B, D, h, w) -> (B, C, h, w)."""
        return torch.relu(self.conv(feat))


class LargeFOVHead(nn.Module):
    """DeepLab-LargeFOV style head: two dilated 3x3 convs and a 1x1 classifier.

    Args:
        dim: input channels D.
        hidden: hidden channels.
        num_classes: K segmentation classes (background included when the ClassSpec has one).
        dilation: dilation of the 3x3 convs.
    """

    def __init__(self, dim: int, hidden: int, num_classes: int, dilation: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
        )
        self.cls = nn.Conv2d(hidden, num_classes, 1, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> seg logits (B, K, h, w)."""
        return self.cls(self.body(feat))


SEG_HEADS = ("largefov", "deeplabv3")


def seg_head(kind: str, dim: int, hidden: int, num_classes: int) -> nn.Module:
    """A segmentation head (B, D, h, w) -> (B, K, h, w): ``largefov`` (:class:`LargeFOVHead`, ``hidden``
    wide: ToCo's) or ``deeplabv3`` (torchvision's ``DeepLabHead``: ASPP at rates 12, 24, 36 with image
    pooling, 256 channels, BatchNorm; on a ResNet at output stride 8 this is torchvision's
    ``deeplabv3_resnet50/101`` without its auxiliary head; ``hidden`` is unused)."""
    if kind == "largefov":
        return LargeFOVHead(dim, hidden, num_classes)
    if kind == "deeplabv3":
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        return DeepLabHead(dim, num_classes)
    raise ValueError(f"unknown seg head '{kind}' ({' | '.join(SEG_HEADS)})")


class ProjectionHead(nn.Module):
    """DINO-style projector: 3-layer MLP (GELU) to a bottleneck, L2 normalisation, then a weight-normalised
    linear layer whose gain is fixed at 1 (each output is a cosine to a learned direction). ToCo's class-token
    projector and FSR's DINO head.

    Args:
        dim: input width D.
        out_dim: output width K.
        hidden: MLP width.
        bottleneck: bottleneck width.
        last_init: the last layer's directions: ``kaiming`` (nn.Linear's default, as ToCo's official head, whose
            trunc-normal init runs before that layer exists) or ``trunc_normal`` (std 0.02, as DINO and FSR,
            whose init covers every layer). The rows are normalised, so their size only sets how fast their
            directions turn under AdamW.
    """

    def __init__(self, dim: int, out_dim: int = 1024, hidden: int = 2048, bottleneck: int = 256,
                 last_init: str = "kaiming") -> None:  # fmt: skip
        super().__init__()
        if last_init not in ("kaiming", "trunc_normal"):
            raise ValueError(f"last_init must be kaiming or trunc_normal, got {last_init!r}")
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))  # fmt: skip
        last = torch.empty(out_dim, bottleneck)
        if last_init == "trunc_normal":  # the random draws of DINO's order: the last layer built, then all initialised
            nn.init.kaiming_uniform_(last, a=math.sqrt(5))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if last_init == "trunc_normal":
            nn.init.trunc_normal_(last, std=0.02)
        else:
            nn.init.kaiming_uniform_(last, a=math.sqrt(5))
        self.last = nn.Parameter(last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., out_dim)."""
        z = nn.functional.normalize(self.mlp(x), dim=-1)
        return nn.functional.linear(z, nn.functional.normalize(self.last, dim=1).to(z.dtype))

    def upgrade_state_dict(self, state: dict, prefix: str) -> dict:
        """Checkpoints of FSR's separate DINO head (before the two heads were one class) kept the last layer as
        ``last.weight``; read it as ``last`` (called by :func:`wsss.engine.checkpoint.load_weights`)."""
        if prefix + "last.weight" in state and prefix + "last" not in state:
            state[prefix + "last"] = state.pop(prefix + "last.weight")
        return state


class MLPHead(nn.Module):
    """Two-layer MLP projector with L2-normalised output, for contrastive losses.

    Args:
        dim: input width D.
        out_dim: embedding width E.
        hidden: hidden width (0: D).
    """

    def __init__(self, dim: int, out_dim: int = 128, hidden: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden or dim), nn.GELU(), nn.Linear(hidden or dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> unit vectors (..., E)."""
        return nn.functional.normalize(self.net(x), dim=-1)
