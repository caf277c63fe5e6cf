"""The dataset's own section of ``data``: ``data.<dataset>.*`` typed by that dataset's ``Config``
(:class:`wsss.data.spec.DatasetSpec`), and the keys that moved there from ``data.*``."""

from __future__ import annotations

import dataclasses
from typing import Any

from wsss.config.values import ConfigError, build_dataclass

# Keys that were data.* for every dataset and now belong to one dataset's own section, with the default they
# had; run directories written before still load (moved when the dataset has the key, dropped at the default).
MOVED_DATA_KEYS = {"holdout": 0.1, "no_background": False}


def dataset_options(section: Any, default: str) -> tuple[dict[str, Any], Any]:
    """(the data section without the dataset's own, that section built by the dataset's Config or None);
    ``default``: the dataset when the section names none."""
    from wsss.registry import DATASETS

    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"config key 'data' is a section: give its keys (--data.KEY VALUE), got {section!r}")
    sec = dict(section or {})
    name = sec.get("dataset", default)
    try:
        entries = DATASETS.entries()
        spec = DATASETS.get(name)
    except KeyError as e:
        raise ConfigError(f"config key 'data.dataset': {e.args[0]}") from None
    config_cls = getattr(spec, "Config", None)
    own = sec.pop(name, None)
    if own is not None and not isinstance(own, dict):
        raise ConfigError(f"config key 'data.{name}' is a section: give its keys (--data.{name}.KEY VALUE), "
                          f"got {own!r}")  # fmt: skip
    own = dict(own or {})
    if others := [k for k in sec if k in entries]:
        raise ConfigError(f"config key 'data.{others[0]}' configures the {others[0]} dataset, but data.dataset is "
                          f"'{name}'")  # fmt: skip
    if "options" in sec:
        raise ConfigError(f"config key 'data.options': give the dataset's settings as data.{name}.KEY")
    fields = {f.name for f in dataclasses.fields(config_cls)} if config_cls is not None else set()
    for key, old_default in MOVED_DATA_KEYS.items():
        if key not in sec:
            continue
        value = sec.pop(key)
        if key in fields:
            own.setdefault(key, value)
        elif value != old_default:
            raise ConfigError(f"config key 'data.{key}' is a setting of one dataset (data.<dataset>.{key}); the "
                              f"{name} dataset has no such setting")  # fmt: skip
    if config_cls is None:
        if own:
            raise ConfigError(f"config key 'data.{name}.{next(iter(own))}': the {name} dataset has no settings")
        return sec, None
    return sec, build_dataclass(config_cls, own, f"data.{name}")
