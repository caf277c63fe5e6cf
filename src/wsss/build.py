"""Factories from a RunConfig: datasets, backbone and method. No name-specific branches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from wsss.config import ConfigError, RunConfig
from wsss.data.base import SegDataset
from wsss.data.classes import ClassSpec
from wsss.data.io import DataError
from wsss.data.transforms import EvalTransform, TrainTransform
from wsss.registry import BACKBONES, DATASETS, METHODS


def build_dataset(cfg: RunConfig, split: str, train: bool, load_masks: bool, use_mask_dir: bool = False) -> SegDataset:
    """The dataset of ``split``: training crops (``train``) or whole images. ``use_mask_dir``: the train
    split's masks come from ``data.mask_dir`` (the trainer's training set only; evaluation always scores
    against the dataset's own masks)."""
    d = cfg.data
    tf: TrainTransform | EvalTransform
    if train:
        lo, hi = d.scale_range
        tf = TrainTransform(d.crop_size, (lo, hi), d.hflip, d.color_jitter, d.p_gray, d.p_blur)
    else:
        tf = EvalTransform()
    try:
        builder = DATASETS.get(d.dataset)
    except KeyError as e:
        raise ConfigError(f"config key 'data.dataset': {e.args[0]}") from None
    if d.max_side < 0:
        raise ConfigError(f"data.max_side must be >= 0 (0: off), got {d.max_side}")
    if not (use_mask_dir and d.mask_dir and split == d.train_split):
        ds = builder(d, split, tf, load_masks)
    else:
        ds = builder(d, split, tf, False)  # the dataset's own masks may not exist (tags-only train splits)
        ds.items = masks_from_dir(ds.items, Path(d.mask_dir).expanduser(), ds.classes)
        ds.load_masks = load_masks
    ds.max_side = d.max_side
    return ds


def masks_from_dir(items: list, mask_dir: Path, classes: ClassSpec) -> list:
    """``items`` with their masks at ``mask_dir/<name>.png``; a missing directory or file, or a
    ``pseudo_labels.json`` there whose classes differ from ``classes``, is a DataError."""
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: data.mask_dir does not exist")
    index = mask_dir / "pseudo_labels.json"
    if index.is_file():
        try:
            meta = json.loads(index.read_text())
            theirs, unfinished = tuple(meta["classes"]), [r["name"] for r in meta["images"] if r.get("done") is False]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{index}: not an index written by wsss pseudo-labels") from None
        if unfinished:  # the export stopped before these were written (or rewritten)
            raise DataError(f"{index}: the export that wrote this folder did not finish ({len(unfinished)} images, "
                            f"e.g. {unfinished[0]}); rerun wsss pseudo-labels with --overwrite")  # fmt: skip
        if theirs != tuple(classes.seg_names):
            raise DataError(f"{index}: labels of classes {', '.join(theirs)}; this dataset's are "
                            f"{', '.join(classes.seg_names)}")  # fmt: skip
    out = [dataclasses.replace(it, mask=mask_dir / f"{Path(it.name).name}.png") for it in items]
    missing = [it for it in out if not it.mask.is_file()]
    if missing:
        raise DataError(f"{missing[0].mask}: no mask for image {missing[0].image} in data.mask_dir "
                        f"({len(missing)} of {len(out)} missing)")  # fmt: skip
    return out


def build_eval_dataset(cfg: RunConfig, split: str) -> SegDataset:
    """Whole images of ``split`` for scoring: with masks (``load_masks`` True) when every image has one,
    tags only (False: scored at the tag level) when none has; some but not all is a DataError."""
    ds = build_dataset(cfg, split, train=False, load_masks=False)
    missing = [it for it in ds.items if it.mask is None]
    if missing and len(missing) < len(ds.items):
        raise DataError(
            f"{missing[0].image}: no mask for this image ({len(missing)} of the {len(ds.items)} "
            f"images of split '{split}' lack one): give every image a mask, or none to score the tags"
        )
    ds.load_masks = not missing
    return ds


def model_config(cfg: RunConfig):
    """ModelConfig with img_size resolved (0 -> data.crop_size)."""
    m = cfg.model
    return dataclasses.replace(m, img_size=m.img_size or cfg.data.crop_size)


def build_method(cfg: RunConfig, classes: ClassSpec):
    """Backbone + the configured method."""
    model_cfg = model_config(cfg)
    from wsss.models.cnn import resolve_arch

    try:
        builder = BACKBONES.get(resolve_arch(model_cfg))
    except KeyError as e:
        raise ConfigError(f"config key 'model.arch': {e.args[0]}") from None
    backbone = builder(model_cfg)
    return METHODS.get(cfg.method_name)(cfg.method, classes, backbone, model_cfg)
