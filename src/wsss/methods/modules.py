"""Pipeline modules: the parts a method recipe switches on over the single-stage pipeline.

A module owns its parameters, its losses and its warm-up iteration, and talks to the pipeline only
through the hooks below, so modules from different papers stack: a recipe lists them in
``method.modules`` (e.g. ``[cf_bilstm, class_tokens, spatial_contrast]``) and configures each in the
method section under its own name (``method.cf_bilstm.hidden``). Register with
``@MODULES.register("name")`` and give the class a frozen ``Config``.

Order of the hooks in one training step of the host method:
``attach`` then ``finalize`` (once, at build) -> backbone forward (each module's ``layers`` / ``attn_layers`` are
requested) -> ``refine_features`` on every backbone pass, training and inference, in the order of
``method.modules`` -> ``fuse_cam`` on every CAM pass -> ``extend`` (adds entries to the step state, in
the order of ``method.modules``) -> ``losses`` -> after the optimizer step ``on_step_end``.

A module that works on another's state (RCA's contrast and aggregation on the region memory) names it
in ``needs``; the recipe must list that module too (checked at config time), and the instance is
available as ``self.deps[name]`` after the build.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from wsss.registry import MODULES


@dataclass
class StepState:
    """What a training step has computed, for the modules' losses.

    x (B, 3, H, W) images; tags (B, C); valid (B, H, W); out: the BackboneOutput of x; feat (B, D, h, w)
    final patch map; logits (B, C) image class scores; cam (B, C, H, W) multi-scale CAM in [0, 1]
    (detached); aux_cam (B, C, H, W) likewise; tok_labels (B, h, w) token labels from the aux CAM (255:
    uncertain or padding); tok_valid (B, h, w) tokens inside the image (not crop padding); it: iteration;
    gen: per-batch random generator; extras: entries modules add in ``extend`` (e.g. ``class_tokens``
    (B, C, D)).
    """

    x: torch.Tensor
    tags: torch.Tensor
    valid: torch.Tensor
    out: Any
    feat: torch.Tensor
    logits: torch.Tensor
    cam: torch.Tensor
    aux_cam: torch.Tensor
    tok_labels: torch.Tensor
    tok_valid: torch.Tensor
    it: int
    gen: torch.Generator | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class PipelineModule(nn.Module):
    """Base class of the modules; every hook defaults to doing nothing.

    Args:
        cfg: the module's Config instance.
        host: the method the module is part of (gives ``backbone``, ``classes``, ``model_cfg`` and the
            method's ``cfg``: thresholds and the like).
    """

    Config: ClassVar[type]
    needs: ClassVar[tuple[str, ...]] = ()  # modules that must be listed with this one
    layers: tuple[int, ...] = ()  # backbone blocks whose pre-norm maps the module needs in ``StepState.out``
    attn_layers: tuple[int, ...] = ()  # backbone blocks whose attention maps it needs

    def __init__(self, cfg, host) -> None:
        super().__init__()
        self.cfg = cfg
        self.deps: dict[str, PipelineModule] = {}  # a plain dict: the needed modules are not re-registered

    def attach(self, backbone) -> None:
        """Install backbone hooks (called once, after construction)."""

    def finalize(self, host) -> None:
        """Called once at the end of the host's construction, when every head and module exists."""

    def refine_features(self, out) -> None:
        """Refine ``out.tokens`` (B, D, h, w) in place on the BackboneOutput ``out`` (before every head)."""

    def fuse_cam(self, cam: torch.Tensor, out) -> torch.Tensor:
        """Refine raw CAMs (B, C, h, w) using the backbone output ``out`` of the same pass."""
        return cam

    def extend(self, state: StepState) -> None:
        """Add entries to ``state.extras`` for later modules."""

    def losses(self, state: StepState) -> dict[str, tuple[float, torch.Tensor]]:
        """Named (weight, loss) pairs; a loss whose weight is 0 is not computed."""
        return {}

    def on_step_end(self, it: int) -> None:
        """After each optimizer step (memory bank writes, EMA updates)."""


def block_hooks(backbone, module: str) -> dict:
    """The backbone's ``block_hooks`` dict; a ConfigError naming ``module`` when it has none (CNNs)."""
    from wsss.config import ConfigError

    hooks = getattr(backbone, "block_hooks", None)
    if hooks is None:
        raise ConfigError(f"method.modules: {module} hooks into ViT blocks; {type(backbone).__name__} has none")
    return hooks


def build_modules(names: tuple[str, ...], method_cfg, host) -> nn.ModuleDict:
    """Instantiate the modules ``names`` with their config sections from ``method_cfg``."""
    mods = nn.ModuleDict()
    for n in names:
        mods[n] = MODULES.get(n)(getattr(method_cfg, n), host)
    for m in mods.values():
        m.deps = {d: mods[d] for d in m.needs}
    return mods


def check_needs(names: list[str]) -> None:
    """Raise ConfigError when a listed module needs a module that is not listed (or listed after it)."""
    from wsss.config import ConfigError

    for i, n in enumerate(names):
        for d in MODULES.get(n).needs:
            if d not in names[:i]:
                where = "listed before it" if d in names else "listed too"
                raise ConfigError(f"method.modules: {n} needs the {d} module, {where} (e.g. modules: [{d}, {n}])")


@functools.cache
def config_with_modules(base: type, sections: tuple[str, ...]) -> type:
    """``base`` (a method Config with a ``modules`` field) extended with one sub-section per module name.

    Cached so that the same sections give the same class (configs compare equal after a round trip).
    """
    if not sections:
        return base
    fields = []
    for n in sections:
        try:
            mcfg = MODULES.get(n).Config
        except KeyError as e:
            raise KeyError(f"method.modules: {e.args[0]}") from None
        fields.append((n, mcfg, field(default_factory=mcfg)))
    cls = dataclasses.make_dataclass(base.__name__, fields, bases=(base,), frozen=True)
    cls.__qualname__ = base.__qualname__
    cls.__doc__ = base.__doc__
    return cls
