"""Building a frozen dataclass tree from parsed TOML, strictly: unknown keys
and wrong types become problems (one line each, naming the key) rather than
exceptions, so that pipeline.core.config reports them all together. bool is never
a number; integers are 64-bit; arrays and tables are bounded in size and depth
(checked before anything is built from them)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

__all__ = ["build", "coerce", "plain", "short", "MAX_LIST", "MAX_DEPTH"]

MAX_LIST = 1024          # entries in any array (model.args.hidden: layers)
MAX_DEPTH = 16           # nesting of arrays and tables in model.args
_INT_BOUND = 1 << 63     # every integer is a signed 64-bit one


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"an array of at most {MAX_LIST} {typing.get_args(tp)[0].__name__}"
    if typing.get_origin(tp) is dict:
        return (f"a table of JSON-like values (strings, numbers, booleans, arrays of at most "
                f"{MAX_LIST} entries, tables; nested at most {MAX_DEPTH} deep; 64-bit integers)")
    return {int: "an integer (64-bit)", float: "a number", str: "a string",
            bool: "a boolean (true or false)"}[tp]


def plain(value: Any, depth: int = 0) -> bool:
    """A value canonical JSON can hold exactly (no dates, no NaN or infinity),
    within bounds: arrays and tables of at most MAX_LIST entries, nested at
    most MAX_DEPTH deep, integers of 64 bits (checked before anything is built)."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return len(value) <= MAX_LIST and all(isinstance(k, str) and plain(v, depth + 1)
                                              for k, v in value.items())
    if isinstance(value, list):
        return len(value) <= MAX_LIST and all(plain(v, depth + 1) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -_INT_BOUND <= value < _INT_BOUND
    return isinstance(value, (str, bool))


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as ``tp`` or raise TypeError. bool is never a number."""
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict) or not plain(value):
            raise TypeError
        return value
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST:
            raise TypeError  # bounded before any element is looked at
        return tuple(coerce(v, inner) for v in value)
    if tp is bool or isinstance(value, bool):
        if tp is not bool or not isinstance(value, bool):
            raise TypeError  # bool is never a number, and only a bool is a bool
        return value
    if isinstance(value, int) and not -_INT_BOUND <= value < _INT_BOUND:
        raise TypeError  # beyond 64 bits: no array, file or RNG key could hold it
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise TypeError
    return value


def short(value: Any) -> str:
    """repr(value), cut to 80 characters (a value may be megabytes long)."""
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{', '.join(map(repr, value[:4]))}, ... ({len(value)} entries)]"
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def build(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    """``cls`` (a dataclass, nested ones built recursively) from the fields
    ``raw`` gives, the rest at their defaults; each unknown key and wrong type
    is appended to ``problems`` as ``"<prefix><key>: expected ..., found ..."``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            problems.append(f"{prefix}{k}: unknown key (expected one of {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    for name, tp in hints.items():
        if name not in raw:
            continue
        key, value = prefix + name, raw[name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a table, found {type(value).__name__}")
            else:
                kwargs[name] = build(tp, value, key + ".", problems)
            continue
        try:
            kwargs[name] = coerce(value, tp)
        except TypeError:
            problems.append(f"{key}: expected {_type_name(tp)}, found {short(value)} "
                            f"({type(value).__name__})")
    return cls(**kwargs)
