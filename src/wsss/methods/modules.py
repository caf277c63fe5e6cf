"""Pipeline modules: the parts a method recipe switches on over the single-stage pipeline.

A module owns its parameters, its losses and its warm-up iteration, and talks to the pipeline only
through the hooks below, so modules from different papers stack: a recipe lists them in
``method.modules`` (e.g. ``[cf_bilstm, class_tokens, spatial_contrast]``) and configures each in the
method section under its own name (``method.cf_bilstm.hidden``). Register with
``@MODULES.register("name")`` and give the class a frozen ``Config``.

Order of the hooks in one training step of the host method:
``attach`` then ``finalize`` (once, at build) -> backbone forward (each module's ``layers`` / ``attn_layers`` are
requested) -> ``refine_features`` on every backbone pass, training and inference, in the order of
``method.modules`` (a module may also put a finer map for the seg head under ``maps[SEG_FEATURES]``)
-> ``fuse_cam`` on every CAM pass -> ``extend`` (adds entries to the step state, in the order of
``method.modules``) -> ``losses`` -> after the optimizer step ``on_step_end``.

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

# BackboneOutput.maps key of a finer map (B, D, H, W) a module builds for the seg head (WS-FCN's fusion at
# the low-level stride); without it the seg head reads the final map ``tokens``.
SEG_FEATURES = "seg_features"


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
    needs: ClassVar[tuple[str, ...]] = ()  # modules that must be listed (before) with this one
    vit_only: ClassVar[bool] = False  # hooks into ViT blocks or patch embeddings: refused with a CNN
    loss_names: ClassVar[tuple[str, ...]] = ()  # names its losses get in the logs and metrics.jsonl
    warmup_key: ClassVar[str] = ""  # its config key holding a warm-up iteration, if any
    uses: ClassVar[str] = ""  # what else it reads or keeps (attention maps, a bank, a teacher), for `wsss list`
    teacher_views: ClassVar[tuple[int, ...]] = ()  # FSR teacher passes it reads: 1 training crop, 2 second view
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

    def predictor(self):
        """Another network (same class as the host) to predict with at evaluation, or None (the host)."""
        return None

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


def check_backbone(names: list[str], model_cfg) -> None:
    """Raise ConfigError when a ViT-only module is listed with a CNN backbone (``model.arch``/``backbone``)."""
    from wsss.config import ConfigError

    vit_only = [n for n in names if MODULES.get(n).vit_only]
    if not vit_only:
        return
    from wsss.models.cnn import resolve_arch

    if resolve_arch(model_cfg) != "vit":
        verb = "needs" if len(vit_only) == 1 else "need"
        raise ConfigError(f"method.modules: {', '.join(vit_only)} {verb} a ViT backbone (they hook into its blocks or "
                          f"patch embeddings); model.backbone {model_cfg.backbone} is a CNN")  # fmt: skip


def build_modules(names: tuple[str, ...], method_cfg, host) -> nn.ModuleDict:
    """Instantiate the modules ``names`` with their config sections from ``method_cfg``."""
    mods = nn.ModuleDict()
    for n in names:
        mods[n] = MODULES.get(n)(getattr(method_cfg, n), host)
    for m in mods.values():
        m.deps = {d: mods[d] for d in m.needs}
    return mods


def check_needs(names: list[str]) -> None:
    """Raise ConfigError when a module is listed twice, or needs a module that is not listed before it."""
    from wsss.config import ConfigError

    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"method.modules: {', '.join(dup)} listed more than once")
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


def describe_modules() -> list[dict]:
    """One row per registered module: name, method(s) whose recipe switches it on, losses, warm-up key and
    default, needed modules, what else it uses; for ``wsss list modules``."""
    from wsss.registry import METHODS

    owners: dict[str, list[str]] = {}
    for m in METHODS.names():
        for n in getattr(METHODS.get(m).Config(), "modules", ()) or ():
            owners.setdefault(n, []).append(m)
    rows = []
    for n in MODULES.names():
        cls = MODULES.get(n)
        warm = f"{cls.warmup_key}={getattr(cls.Config(), cls.warmup_key)}" if cls.warmup_key else "-"
        rows.append({"name": n, "method": ", ".join(owners.get(n, [])) or "-",
                     "losses": ", ".join(cls.loss_names) or "-", "warmup": warm,
                     "needs": ", ".join(cls.needs) or "-", "uses": cls.uses or "-", "vit_only": cls.vit_only,
                     "doc": (cls.__doc__ or "").strip().splitlines()[0]})  # fmt: skip
    return rows
