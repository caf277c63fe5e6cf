"""Factories from a RunConfig: datasets, backbone and method. No name-specific branches."""

from __future__ import annotations

import dataclasses

from wsss.config import ConfigError, RunConfig
from wsss.data.base import SegDataset
from wsss.data.classes import ClassSpec
from wsss.data.io import DataError
from wsss.data.transforms import EvalTransform, TrainTransform
from wsss.registry import BACKBONES, DATASETS, METHODS


def build_dataset(cfg: RunConfig, split: str, train: bool, load_masks: bool) -> SegDataset:
    """The dataset of ``split``: training crops (``train``) or whole images."""
    d = cfg.data
    if train:
        tf = TrainTransform(d.crop_size, tuple(d.scale_range), d.hflip, d.color_jitter, d.p_gray, d.p_blur)
    else:
        tf = EvalTransform()
    try:
        builder = DATASETS.get(d.dataset)
    except KeyError as e:
        raise ConfigError(f"config key 'data.dataset': {e.args[0]}") from None
    return builder(d, split, tf, load_masks)


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
    mcfg = model_config(cfg)
    from wsss.models.cnn import resolve_arch

    try:
        builder = BACKBONES.get(resolve_arch(mcfg))
    except KeyError as e:
        raise ConfigError(f"config key 'model.arch': {e.args[0]}") from None
    backbone = builder(mcfg)
    return METHODS.get(cfg.method_name)(cfg.method, classes, backbone, mcfg)
