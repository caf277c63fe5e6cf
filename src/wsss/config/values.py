"""The typed layer under the run configuration: :class:`ConfigError`, dataclasses built from nested dicts
(unknown keys and wrong types refused with their dotted name), recipe merging and dotted command-line
overrides (``--train.max_iters 100``)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from typing import Any

import yaml

log = logging.getLogger("wsss")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, members[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"config key '{key}' needs {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is list:
        (a,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, a, key) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and value is None:
        return ""
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def build_dataclass(cls: type, values: dict[str, Any] | None, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a dict; unknown keys and wrong types raise ConfigError.

    Args:
        cls: a dataclass type.
        values: its fields as a (possibly nested) dict.
        prefix: dotted path of this section, for error messages.
    """
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix}' is a section: give its keys (--{prefix}.KEY VALUE), got {values!r}")
    values = _renamed(cls, dict(values or {}), prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, val in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, val, full)
        else:
            kwargs[key] = _coerce(val, tp, full)
    return cls(**kwargs)


def _renamed(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` with the keys that ``cls.renamed_keys`` (old name -> new name) lists under their new names, so
    recipes and run directories written before a rename still load (with a warning); both names given is an
    error, since which one the user meant cannot be told."""
    renamed: dict[str, str] = getattr(cls, "renamed_keys", {})
    dot = f"{prefix}." if prefix else ""
    for old, new in renamed.items():
        if old not in values:
            continue
        if new in values:
            raise ConfigError(f"config keys '{dot}{old}' and '{dot}{new}' are one setting (renamed to '{new}'): "
                              f"give only '{dot}{new}'")  # fmt: skip
        log.warning("config key '%s%s' is now '%s%s'; read as it", dot, old, dot, new)
        values[new] = values.pop(old)
    return values


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``, section by section (``over`` wins on values)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def split_overrides(tokens: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pair ``--a.b v`` / ``--a.b=v`` tokens into (key, raw value); other tokens are returned apart, in order."""
    items: list[tuple[str, str]] = []
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            rest.append(tok)
            i += 1
        elif "=" in tok:
            key, _, raw = tok[2:].partition("=")
            items.append((key, raw))
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"override '{tok}' has no value")
            items.append((tok[2:], tokens[i + 1]))
            i += 2
    return items, rest


def drop_section(overrides: list[str], section: str) -> list[str]:
    """``overrides`` without the keys of ``section`` (e.g. a weak recipe's ``method.*`` keys, which another
    method's config would reject), as ``--key=value`` tokens."""
    pairs, rest = split_overrides(overrides)
    return [f"--{k}={v}" for k, v in pairs if not k.startswith(section + ".")] + rest


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``["--train.max_iters", "5", "--data.root=/x"]`` style overrides (values parsed as YAML)."""
    data = deep_merge({}, data)
    items, rest = split_overrides(overrides)
    if rest:
        raise ConfigError(f"unexpected argument '{rest[0]}' (overrides look like --train.max_iters 100)")
    for key, raw in items:
        val = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
        node[parts[-1]] = val
    return data
