"""Run configuration: frozen dataclasses filled from YAML recipes plus dotted command-line overrides.

Why our own ~150 lines rather than jsonargparse (the usual choice): the ``method`` section's schema
depends on the method chosen (each method owns a ``Config`` dataclass) and on the modules it stacks;
resolving that in two phases is simplest with plain dataclasses, and it keeps ``wsss --help`` free of
heavy imports. What jsonargparse would give is kept: strict typed validation, unknown keys rejected
with their dotted name and a close match, ``--print_config``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsss.config.datasets import dataset_options
from wsss.config.values import ConfigError, apply_overrides, build_dataclass, deep_merge
from wsss.config.values import drop_section as drop_section  # re-exported: the commands' override helpers
from wsss.config.values import split_overrides as split_overrides

log = logging.getLogger("wsss")


def _at_least(cfg, section: str, **lows: int) -> None:
    """ConfigError naming the first field of ``cfg`` below its lowest allowed value in ``lows``."""
    for name, low in lows.items():
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < low:
            raise ConfigError(f"config key '{section}.{name}' must be a number >= {low}, got {v!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how training crops are made."""

    dataset: str = "voc"  # voc | coco | folder | demo
    root: str = ""  # dataset root; empty: $WSSS_DATA/<dataset>
    train_root: str = ""  # overrides root for the train split (folder datasets: a separate folder)
    val_root: str = ""  # overrides root for the val split
    train_split: str = "train_aug"
    val_split: str = "val"
    crop_size: int = 448
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    color_jitter: float = 0.3  # brightness/contrast/saturation strength; 0 switches it off
    p_gray: float = 0.0  # probability of a greyscale training image (ToCo: 0.2)
    p_blur: float = 0.0  # probability of a Gaussian blur, radius 0.1-2 px (ToCo's training view: 1.0)
    num_workers: int = 2
    max_val_images: int = 0  # 0: all
    # images whose longer side exceeds this are read downscaled to it (masks nearest), in training,
    # evaluation (scored at that size) and pseudo-label export; 0: as they are
    max_side: int = 0
    # a directory of <name>.png label masks (255 ignored) read for the train split instead of the dataset's
    # own, e.g. `wsss pseudo-labels` output for a second stage; the val split keeps its ground truth
    mask_dir: str = ""
    # training images that fail to decode (changed after the start-up check) are replaced by the next image,
    # with a warning, up to this many per loader process; then the run stops (0: stop at the first)
    max_bad_images: int = 10
    # the dataset's own settings, given as the section data.<dataset> (e.g. data.folder.holdout) and typed by
    # the registered dataset's Config; None for a dataset without settings
    options: Any = None

    def __post_init__(self) -> None:
        _at_least(self, "data", crop_size=1, num_workers=0, max_val_images=0, max_bad_images=0)
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"config key 'data.scale_range' must be [low, high] with 0 < low <= high, got "
                              f"{list(self.scale_range)}")  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and shared heads."""

    backbone: str = "vit_base_patch16_224"
    arch: str = "auto"  # vit | cnn | auto (from the timm model's family); selects the backbone wrapper
    weights: str = "timm"  # timm (pretrained download, or $WSSS_WEIGHTS) | none | /path/to/file
    img_size: int = 0  # position-embedding grid the model is built for; 0: data.crop_size
    drop_path: float = 0.1
    freeze_blocks: int = 0  # freeze the patch embedding and the first N blocks (cheaper backward, less memory)
    output_stride: int = 16  # CNN backbones only: 8 or 16 (dilated last stages) or 32
    aux_layer: int = -3  # block whose tokens feed the auxiliary CAM head
    seg_hidden: int = 512  # width of the LargeFOV segmentation head (ToCo's is 512)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with separate backbone and head learning rates; lr stated for the total batch."""

    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "poly"  # poly | cosine
    power: float = 0.9
    warmup_iters: int = 1500
    warmup_lr: float = 1e-6
    grad_clip: float = 0.0  # 0: off

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"config key 'optim.lr' must be > 0, got {self.lr!r}")
        for name in ("warmup_lr", "grad_clip", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"config key 'optim.{name}' must be >= 0, got {getattr(self, name)!r}")
        _at_least(self, "optim", warmup_iters=0)


@dataclass(frozen=True)
class TrainConfig:
    """The iteration loop. ``batch_size`` is the total batch over all processes and accumulation."""

    max_iters: int = 20000
    batch_size: int = 4
    micro_batch: int = 0  # images per process per forward; 0: batch_size / world size
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 2000
    eval_every: int = 2000  # 0: only at the end; -1: never (no masks needed for the val split)
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    threads: int = 0  # intra-op CPU threads; 0: $OMP_NUM_THREADS, else the CPUs this process may use
    device: str = "auto"
    out_dir: str = "runs"
    run_name: str = ""  # empty: <method>-<dataset>-<time>
    tensorboard: bool = False
    # checkpoints kept: last.pt plus, above 1, the newest keep_last - 1 earlier ones as iter_NNNNNN.pt (a run
    # whose weights went bad before its loss did can go back to one of them)
    keep_last: int = 1
    # consecutive optimizer steps with a non-finite loss or gradient (each skipped) before the run stops
    nan_patience: int = 5

    def __post_init__(self) -> None:
        _at_least(self, "train", max_iters=1, batch_size=1, micro_batch=0, log_every=1, ckpt_every=1, eval_every=-1,
                  threads=0, keep_last=1, nan_patience=1)  # fmt: skip


@dataclass(frozen=True)
class EvalConfig:
    """Inference and evaluation protocol."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    reduce: str = "mean"  # over scales: mean | max (ToCo's and FSR's test protocol; flips are averaged first)
    bkg_thre: float = 0.5  # fixed background threshold for CAM evaluation
    sweep: bool = True  # also report the oracle background-threshold sweep (labelled as such)
    batch_size: int = 1
    split: str = ""  # empty: data.val_split
    crf: str = "none"  # dense CRF on the seg probabilities: none | dense ([crf] extra) | torch (same CRF in torch)
    # seg logits from windows of this side in px (0: the whole image at once), overlapping by this fraction
    window: int = 0
    overlap: float = 1 / 3

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "max"):
            raise ConfigError(f"config key 'eval.reduce' must be mean or max, got {self.reduce!r}")
        if self.window < 0 or not 0 <= self.overlap < 1:
            raise ConfigError(f"eval.window must be >= 0 and eval.overlap in [0, 1), got {self.window}, {self.overlap}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; ``method`` holds the chosen method's own Config dataclass."""

    method_name: str = "toco"
    method: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _extends(name: str, base_name: str) -> bool:
    from wsss.registry import METHODS

    try:
        return issubclass(METHODS.get(name), METHODS.get(base_name))
    except KeyError:
        return False  # an unknown name is reported by resolve()


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe (a file, or a packaged recipe's name such as ``bench/toco``: see ``wsss.recipes``); a
    ``_base_`` key (path relative to the file) is loaded first and merged under it (``_chain``: the files
    that named this one, to refuse a cycle)."""
    from wsss.recipes import close_names, find_recipe

    found = find_recipe(path)
    if found is None:
        near = close_names(path)
        hint = f"; packaged recipes like it: {', '.join(near)}" if near else "; `wsss list recipes` lists the packaged"
        raise ConfigError(f"{path}: config file not found (neither a file nor a packaged recipe){hint}")
    path = found
    if path.resolve() in _chain:
        raise ConfigError(f"{path}: _base_ cycle ({' -> '.join(p.name for p in (*_chain, path.resolve()))})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("_base_", None)
    sections = {f.name for f in dataclasses.fields(RunConfig)} - {"method_name"}
    for key, value in data.items():  # checked here: merging a base into a scalar section would crash
        if key in sections and not isinstance(value, (dict, type(None))):
            raise ConfigError(f"{path}: '{key}' is a section: give its keys on their own lines, got {value!r}")
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: _base_ must be a file name, got {base!r}")
        # the file's own neighbour, never a packaged name
        base_data = read_yaml((path.parent / base).resolve(), (*_chain, path.resolve()))
        # A recipe that names another method replaces the base's method section instead of merging into
        # it, unless that method extends the base's (cpf_cte on toco): then it inherits the settings.
        name = (data.get("method") or {}).get("name")
        base_name = (base_data.get("method") or {}).get("name", "toco")
        if name and name != base_name and not _extends(name, base_name):
            base_data.pop("method", None)
        data = deep_merge(base_data, data)
    return data


def resolve(data: dict[str, Any]) -> RunConfig:
    """Turn a merged dict into a RunConfig; the method section is validated by the method's Config."""
    from wsss.registry import METHODS

    data = dict(data)
    if not isinstance(data.get("method") or {}, dict):
        raise ConfigError(f"config key 'method' is a section: give its keys (--method.KEY VALUE), got "
                          f"{data['method']!r}")  # fmt: skip
    method_sec = dict(data.pop("method", None) or {})
    if "bkg_thre" in method_sec:  # run directories written while the toco family had its own copy
        moved, ev = method_sec.pop("bkg_thre"), dict(data.get("eval") or {})
        if "bkg_thre" not in ev:
            data["eval"] = {**ev, "bkg_thre": moved}
        elif ev["bkg_thre"] != moved:
            log.warning("config key 'method.bkg_thre' (%s) is no longer read: CAMs are scored at eval.bkg_thre (%s); "
                        "--eval.bkg_thre %s scores them as before", moved, ev["bkg_thre"], moved)  # fmt: skip
    data_sec, options = dataset_options(data.get("data"), DataConfig.dataset)
    data["data"] = data_sec
    name = method_sec.pop("name", "toco")
    try:
        method_cls = METHODS.get(name)
    except KeyError as e:
        raise ConfigError(f"config key 'method.name': {e.args[0]}") from None
    try:
        config_cls = method_cls.config_class(method_sec)
    except KeyError as e:
        raise ConfigError(f"config key {e.args[0]}") from None
    method_cfg = build_dataclass(config_cls, method_sec, "method")
    base = build_dataclass(RunConfig, data, "")
    cfg = dataclasses.replace(base, method_name=name, method=method_cfg,
                              data=dataclasses.replace(base.data, options=options))  # fmt: skip
    method_cls.validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Recipe file (or defaults) + dotted overrides -> validated RunConfig."""
    data = read_yaml(path) if path else {}
    return resolve(apply_overrides(data, overrides or []))


def get_dotted(cfg: RunConfig, key: str) -> Any:
    """The value of dotted ``key`` (``"data.crop_size"``) in ``cfg``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict of a RunConfig (tuples as lists), as written to config.yaml."""

    def conv(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (tuple, list)):
            return [conv(v) for v in x]
        return x

    d = conv(cfg)
    d["method"] = {"name": d.pop("method_name"), **(d.get("method") or {})}
    options = d["data"].pop("options")
    if options is not None:
        d["data"][cfg.data.dataset] = options
    return {"method": d.pop("method"), **d}


def dump_config(cfg: RunConfig) -> str:
    """YAML text of the resolved config; loading it back gives the same RunConfig."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
