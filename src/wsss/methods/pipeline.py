"""The pipeline-module contract, both sides: the modules a method recipe switches on, and the host
method that runs them (:class:`ModuleHost`, ToCo's pipeline and every method built on it).

A module owns its parameters, its losses and its warm-up iteration, and talks to the pipeline only
through the hooks below, so modules from different papers stack: a recipe lists them in
``method.modules`` (e.g. ``[cf_bilstm, class_tokens, spatial_contrast]``) and configures each in the
method section under its own name (``method.cf_bilstm.hidden``). Register with
``@MODULES.register("name")`` and give the class a frozen ``Config``. Adding a module edits its own
file, its recipe and its tests: nothing in the host.

Order of the hooks in one training step of the host (``ModuleHost`` calls them):
``attach`` then ``finalize`` (once, at build) -> backbone forward (each module's ``layers`` / ``attn_layers`` are
requested) -> ``refine_features`` on every backbone pass, training and inference, in the order of
``method.modules`` (a module may also put a finer map for the seg head under ``maps[SEG_FEATURES]``)
-> ``fuse_cam`` on every CAM pass -> ``extend`` (fills its fields of the :class:`StepState`, in the
order of ``method.modules``) -> ``losses`` -> ``refine_labels`` on the host's PAR-refined pseudo labels
(training and ``pseudo_labels``) -> after the optimizer step ``on_step_end``.

A module that works on another's state (RCA's contrast and aggregation on the region memory) names it
in ``needs``; the recipe must list that module too (checked at config time), and the instance is
available as ``self.deps[name]`` after the build.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, ItemsView, Sequence, ValuesView
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.nn as nn

from wsss.registry import MODULES

# BackboneOutput.maps key of a finer map (B, D, H, W) a module builds for the seg head (WS-FCN's fusion at
# the low-level stride); without it the seg head reads the final map ``feat``.
SEG_FEATURES = "seg_features"


@dataclass
class StepState:
    """What a training step has computed, for the modules' losses.

    Set by the host: x (B, 3, H, W) images; tags (B, C); valid (B, H, W); out: the BackboneOutput of x;
    feat (B, D, h, w) final patch map; logits (B, C) image class scores; cam (B, C, H, W) multi-scale CAM
    in [0, 1] (detached); aux_cam (B, C, H, W) likewise; tok_labels (B, h, w) token labels from the aux
    CAM (255: uncertain or padding); tok_valid (B, h, w) tokens inside the image (not crop padding); it:
    iteration; gen: the step's sample-seeded random generator.

    Filled by modules in ``extend`` (None until then): class_tokens (B, C, D) final class tokens
    (``class_tokens``); region_feats (B, C, D) unit region features and region_has (B, C) bool
    (``region_memory``); view: the second augmented view, a :class:`wsss.data.views.View`
    (``ema_teacher``); view_mask (B, h, w) bool masked tokens of the view and embed_hook fn(tokens (B, h,
    w, D)) -> tokens applying it before the position embedding (``uncertain_masking``); teacher_out
    {name: (B, D, h, w)} the student's and teacher's maps of the views, computed once per step
    (``ema_teacher``).
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
    class_tokens: torch.Tensor | None = None
    region_feats: torch.Tensor | None = None
    region_has: torch.Tensor | None = None
    view: Any = None
    view_mask: torch.Tensor | None = None
    embed_hook: Callable[[torch.Tensor], torch.Tensor] | None = None
    teacher_out: dict[str, torch.Tensor] | None = None


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
    layers: tuple[int, ...] = ()  # backbone blocks whose pre-norm maps the module needs in ``StepState.out``
    attn_layers: tuple[int, ...] = ()  # backbone blocks whose attention maps it needs
    # FSR teacher passes it reads: 1 training crop, 2 second view (FSR's ema_teacher sets the union on itself)
    teacher_views: Sequence[int] = ()

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
        """Refine ``out.feat`` (B, D, h, w) in place on the BackboneOutput ``out`` (before every head)."""

    def fuse_cam(self, cam: torch.Tensor, out) -> torch.Tensor:
        """Refine raw CAMs (B, C, h, w) using the backbone output ``out`` of the same pass."""
        return cam

    def extend(self, state: StepState) -> None:
        """Fill this module's fields of ``state`` for later modules."""

    def losses(self, state: StepState) -> dict[str, tuple[float, torch.Tensor]]:
        """Named (weight, loss) pairs; a loss whose weight is 0 is not computed."""
        return {}

    def refine_labels(self, labels: torch.Tensor, cam: torch.Tensor, images: torch.Tensor, tags: torch.Tensor,
                      valid: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """Pseudo labels (B, H, W) (255: uncertain) after the host's PAR refinement of ``cam`` (B, C, H, W) ->
        (B, H, W); the default keeps them."""
        return labels

    def on_step_end(self, it: int) -> None:
        """After each optimizer step (memory bank writes, EMA updates)."""


if TYPE_CHECKING:

    class PipelineModuleDict(nn.ModuleDict):
        """For the type checker only: the ``nn.ModuleDict`` of a host's modules, whose values are all
        :class:`PipelineModule` (at run time a plain ``nn.ModuleDict``)."""

        def __getitem__(self, key: str) -> PipelineModule: ...
        def items(self) -> ItemsView[str, PipelineModule]: ...
        def values(self) -> ValuesView[PipelineModule]: ...


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


def build_modules(names: tuple[str, ...], method_cfg, host) -> PipelineModuleDict:
    """Instantiate the modules ``names`` with their config sections from ``method_cfg``."""
    mods = cast("PipelineModuleDict", nn.ModuleDict())
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
            config_cls = MODULES.get(n).Config
        except KeyError as e:
            raise KeyError(f"method.modules: {e.args[0]}") from None
        fields.append((n, config_cls, field(default_factory=config_cls)))
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


class ModuleHost:
    """The host side of the contract, mixed into a :class:`wsss.methods.base.Method` whose ``cfg`` has a
    ``modules`` field (ToCo's pipeline): it builds the modules and runs their hooks, in the order of
    ``method.modules``. The host's own step calls, in this order: ``init_modules`` once, last in its
    constructor (its heads exist by then: FSR's teacher copies the finished network); ``begin_step``;
    ``encode`` for every backbone pass and ``fuse_cams`` on every raw CAM; ``add_module_losses`` with
    its :class:`StepState`; ``refine_labels`` on its pseudo labels; ``modules_step_end`` after the
    optimizer step; ``predictor`` for inference.
    """

    # Provided by the Method this is mixed into, or set by init_modules (declared for the type checker).
    Config: ClassVar[Any]  # the method's Config dataclass (has a ``modules`` field)
    cfg: Any
    backbone: nn.Module
    mods: PipelineModuleDict

    @classmethod
    def config_class(cls, section: dict) -> type:
        """The Config with one sub-section per module listed in ``modules`` or configured in ``section``."""
        from wsss.config import ConfigError

        mods = section.get("modules", cls.Config.modules)
        mods = [mods] if isinstance(mods, str) else list(mods or ())
        extra = [k for k in section if k not in mods and k in MODULES]
        try:
            check_needs(mods)
        except KeyError as e:
            raise ConfigError(f"method.modules: {e.args[0]}") from None
        return config_with_modules(cls.Config, tuple(mods + extra))

    @classmethod
    def validate(cls, run_cfg) -> None:
        """Modules that need a ViT are refused with a CNN backbone, at config time."""
        check_backbone(list(run_cfg.method.modules), run_cfg.model)

    def init_modules(self, layers: tuple[int, ...] = ()) -> None:
        """Build, attach and finalize the modules; backbone passes then return the blocks ``layers`` (the
        host's own, e.g. its auxiliary CAM layer) and those the modules ask for."""
        self.step_gen: torch.Generator | None = None  # the training step's sample-seeded generator
        self.mods = build_modules(tuple(self.cfg.modules), self.cfg, self)
        for m in self.mods.values():
            m.attach(self.backbone)
        self._layers = tuple(dict.fromkeys((*layers, *(i for m in self.mods.values() for i in m.layers))))
        self._attn = tuple(dict.fromkeys(i for m in self.mods.values() for i in m.attn_layers))
        for m in self.mods.values():
            m.finalize(self)

    def begin_step(self, batch: dict, it: int) -> None:
        """Seed ``step_gen``, which random choices inside backbone passes (module dropout) draw from, by the
        batch's samples: processes and accumulated micro-batches then draw alike."""
        from wsss.methods.base import sample_generator

        self.step_gen = sample_generator(batch, it, batch["image"].device, stream=2)

    def encode(self, x: torch.Tensor, attn: bool = True, embed_hook=None):
        """Backbone pass over x (B, 3, H, W) with the blocks (and, with ``attn``, attention maps) the host
        and modules need; ``embed_hook`` fn(tokens (B, h, w, D)) -> tokens runs before the position
        embedding of this pass only (ViTs); the modules then refine the final map in order."""
        kw = {} if embed_hook is None else {"embed_hook": embed_hook}
        out = self.backbone(x, layers=self._layers, attn_layers=self._attn if attn else (), **kw)
        for m in self.mods.values():
            m.refine_features(out)
        return out

    def fuse_cams(self, cam: torch.Tensor, out) -> torch.Tensor:
        """Raw CAMs (B, C, h, w) of the backbone output ``out`` refined by each module in order."""
        for m in self.mods.values():
            cam = m.fuse_cam(cam, out)
        return cam

    def add_module_losses(self, state: StepState, loss: torch.Tensor, logs: dict) -> torch.Tensor:
        """Every module's ``extend``, then every module's weighted losses added to ``loss`` (each logged by
        name in ``logs``)."""
        for m in self.mods.values():
            m.extend(state)
        for m in self.mods.values():
            for name, (wgt, val) in m.losses(state).items():
                loss = loss + wgt * val
                logs[name] = val.detach()
        return loss

    def refine_labels(self, labels, cam, images, tags, valid) -> torch.Tensor:
        """Pseudo labels (B, H, W) through each module's ``refine_labels`` in order."""
        for m in self.mods.values():
            labels = m.refine_labels(labels, cam, images, tags, valid)
        return labels

    def modules_step_end(self, it: int) -> None:
        """Each module's step-end work (bank writes, EMA updates), in order."""
        for m in self.mods.values():
            m.on_step_end(it)

    def predictor(self):
        """The network that predicts: this one, unless a module hands over another (FSR's EMA teacher)."""
        for m in self.mods.values():
            net = m.predictor()
            if net is not None:
                return net
        return self
