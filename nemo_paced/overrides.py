"""Hydra-style `key.sub.key=value` overrides on nested configs (dataclasses, Bridge's ConfigContainer).

The new value is parsed from text (null, true/false, numbers, Python literals for lists, dicts and
quoted strings, otherwise the text itself) and then converted to the kind of the value it replaces:
an int given for a float becomes a float, a name given for an Enum or a `torch.dtype` becomes that
member, a list given for a tuple becomes a tuple. Plain attributes are set with `setattr`, so
objects that mirror their settings (Bridge's DistillationProvider copies each one to the teacher)
keep doing so; frozen dataclasses are rebuilt with `dataclasses.replace`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from enum import Enum
from pathlib import PurePath
from typing import Any, Sequence


class OverrideError(ValueError):
    """A `key=value` override that cannot be applied; the message names the override and the key."""


def parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("null", "none", "~"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _keys(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [str(k) for k in obj]
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    return [k for k in vars(obj) if not k.startswith("_")] if hasattr(obj, "__dict__") else []


def _has(obj: Any, key: str) -> bool:
    return key in obj if isinstance(obj, dict) else hasattr(obj, key)


def _get(obj: Any, key: str) -> Any:
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


def _with(obj: Any, key: str, value: Any) -> Any:
    """`obj` with `key` set to `value`: in place, or a rebuilt copy for frozen dataclasses."""
    if isinstance(obj, dict):
        obj[key] = value
    elif dataclasses.is_dataclass(obj) and obj.__dataclass_params__.frozen:
        return dataclasses.replace(obj, **{key: value})
    else:
        setattr(obj, key, value)
    return obj


def _convert(text: str, current: Any, where: str) -> Any:
    """The value of `text` for a setting that now holds `current`."""
    value = parse_value(text)
    if value is None or current is None:
        return value
    kind = type(current)
    if dataclasses.is_dataclass(current):
        raise OverrideError(f"{where}: this key is a group of settings; set one of its fields instead")
    if isinstance(current, Enum):
        for candidate in (value, text):
            try:
                return kind(candidate)
            except ValueError:
                pass
        choices = ", ".join(str(m.value) for m in kind)
        raise OverrideError(f"{where}: {text!r} is not one of {choices}")
    if isinstance(current, bool) and isinstance(value, bool):
        return value
    if isinstance(current, (str, PurePath)):
        return kind(text)
    if kind.__module__ == "torch" and kind.__name__ == "dtype":
        import torch

        dtype = getattr(torch, text.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
        raise OverrideError(f"{where}: {text!r} is not a torch dtype (e.g. bfloat16)")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, (bool, int, float)) and type(value) is not kind:
        raise OverrideError(f"{where}: {text!r} is not a valid {kind.__name__}")
    return value


def _set(obj: Any, path: list[str], text: str, override: str, prefix: str) -> Any:
    key = path[0]
    where = f"{prefix}{key}"
    if not _has(obj, key):
        hint = difflib.get_close_matches(key, _keys(obj), n=3)
        suggestion = f"; did you mean {', '.join(prefix + h for h in hint)}?" if hint else ""
        raise OverrideError(f"override {override!r}: there is no setting {where!r}{suggestion}")
    if len(path) == 1:
        return _with(obj, key, _convert(text, _get(obj, key), f"override {override!r}"))
    child = _set(_get(obj, key), path[1:], text, override, where + ".")
    return _with(obj, key, child) if child is not _get(obj, key) else obj


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Apply `a.b.c=value` overrides in order; returns the config (a new one if its root is frozen)."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise OverrideError(f"override {override!r} is not of the form key.sub.key=value")
        config = _set(config, key.strip().split("."), text, override, "")
    return config
