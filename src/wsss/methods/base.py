"""The method interface. The trainer, evaluators and CLI only talk to this.

A method is an ``nn.Module`` that owns its heads and losses on top of a shared backbone:
``train_step(batch, it) -> StepOutput`` (called through ``forward`` so that DDP syncs gradients),
``predict_seg``, ``predict_cams``, ``pseudo_labels`` and an optional ``on_step_end`` (EMA teachers,
memory banks). Register with ``@METHODS.register("name")``; give the class a frozen ``Config``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsss.data.classes import ClassSpec


@dataclass
class StepOutput:
    """Total loss (scalar tensor with graph) and named scalars to log (each loss by name): detached scalar
    tensors or floats, which the trainer turns into floats."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Method(nn.Module):
    """Base class; subclasses set ``Config`` and implement ``train_step`` and the predict functions.

    Args:
        cfg: the method's Config instance.
        classes: ClassSpec of the dataset.
        backbone: a ViTBackbone (or any module with the same interface).
        model_cfg: the run's ModelConfig (aux layer, head widths).
    """

    Config: ClassVar[type]
    needs_masks: ClassVar[bool] = False  # reads ground-truth masks in training (fully supervised only)
    has_cams: ClassVar[bool] = True  # predict_cams / pseudo_labels are available

    @classmethod
    def config_class(cls, section: dict) -> type:
        """The Config dataclass for a method section ``section`` (a dict); methods with modules extend it."""
        return cls.Config

    @classmethod
    def validate(cls, run_cfg) -> None:
        """Raise ConfigError when the whole run config (e.g. method and backbone) does not fit together."""

    def __init__(self, cfg, classes: ClassSpec, backbone: nn.Module, model_cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.classes = classes
        self.backbone = backbone
        self.model_cfg = model_cfg

    def forward(self, batch: dict, it: int) -> StepOutput:
        """Same as :meth:`train_step`; lets DDP see the training forward."""
        return self.train_step(batch, it)

    def train_step(self, batch: dict, it: int) -> StepOutput:
        """One forward with losses on ``batch`` (image (B, 3, H, W), tags (B, C), valid (B, H, W))."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """[{params, lr_mult}]: pretrained backbone at lr x1, new layers at the config's head multiplier."""
        bb = [p for p in self.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in bb}
        new = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": bb, "lr_mult": 1.0, "name": "backbone"}, {"params": new, "lr_mult": None, "name": "heads"}]

    def predict_seg(self, images: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (B, K, H, W) at the input size."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_tags(self, images: torch.Tensor) -> torch.Tensor:
        """Image-level class scores (B, C) in [0, 1]: here each foreground class's largest pixel probability
        under :meth:`predict_seg`; methods with an image classifier give its sigmoid instead."""
        o, C = self.classes.fg_offset, self.classes.num_fg
        return self.predict_seg(images).float().softmax(1)[:, o : o + C].amax((2, 3))

    def predict_cams(self, images: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
        """CAMs (B, C, H, W) in [0, 1] at the input size."""
        raise NotImplementedError(f"{type(self).__name__} produces no CAMs")

    def pseudo_labels(
        self,
        images: torch.Tensor,
        tags: torch.Tensor,
        valid: torch.Tensor | None = None,
        cams: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pseudo labels (B, H, W) this method trains its seg head on (255 = ignore); ``cams`` (B, C, H, W)
        from :meth:`predict_cams` can be passed to avoid computing them again."""
        raise NotImplementedError(f"{type(self).__name__} produces no pseudo labels")

    def on_step_end(self, it: int) -> None:
        """Called after each optimizer step (EMA teachers, memory banks)."""

    def on_step_skipped(self, it: int) -> None:
        """Called instead of :meth:`on_step_end` when the trainer skipped the step (non-finite loss or
        gradients): every submodule with a ``discard_pending`` (memory banks, distillation centres) drops
        what this step's forwards queued, so nothing of the bad step is written."""
        for m in self.modules():
            if m is not self and callable(getattr(m, "discard_pending", None)):
                # typed Tensor | Module by nn.Module.__getattr__; a method here (checked callable above)
                cast(Callable[[], None], m.discard_pending)()


def upsample(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to ``size`` (H, W) (no-op when equal)."""
    return (
        x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    )


def sample_generator(batch: dict, it: int, device: torch.device, stream: int = 0) -> torch.Generator | None:
    """A generator seeded by (iteration, the batch's sample indices): random choices inside a step then
    depend on which images are in the micro-batch, not on the process count or accumulation; ``stream``
    k > 0 gives an independent generator for another consumer of the same step. None
    (global RNG) when the batch carries no ``index``."""
    if "index" not in batch:
        return None
    idx = [int(i) for i in batch["index"]]
    key = (it, *idx) if stream == 0 else (stream, it, *idx)
    seed = hash(key) % (2**31)  # tuples of ints hash the same in every process
    return torch.Generator(device=device).manual_seed(seed)
