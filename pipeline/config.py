"""Strict training config: a frozen dataclass tree loaded from one TOML file.

Unknown keys, wrong types and out-of-range values are all collected and
reported together in one ``ConfigError`` naming each key. Overrides are
``section.key=value`` strings whose value is parsed as a TOML value
(``train.epochs=3``, ``model.hidden=[64,32]``, ``mode="exact"`` or
``mode=exact``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .safeio import MIB, read_regular

__all__ = ["Config", "DataConfig", "ModelConfig", "TrainConfig", "OptimConfig",
           "load_config", "parse_overrides", "config_sha256", "config_to_dict"]


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    test_fraction: float = 0.2


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    dropout: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    shards: int = 1
    checkpoint_every: int = 100


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass(frozen=True)
class Config:
    seed: int = 0
    mode: str = "pinned"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


MAX_CONFIG_BYTES = MIB   # a config file larger than this is refused unparsed
MAX_LIST = 64            # entries in any array (model.hidden: layers)
_INT_BOUND = 1 << 63     # every integer is a signed 64-bit one


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# (key, predicate, what was expected): checked after types are right.
_RANGES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
    ("mode", lambda v: v in ("pinned", "exact"), 'one of "pinned", "exact"'),
    ("data.test_fraction", lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    ("model.arch", lambda v: v in ("mlp", "cnn"), 'one of "mlp", "cnn"'),
    ("model.hidden", lambda v: len(v) <= MAX_LIST and all(1 <= h <= 65536 for h in v),
     f"at most {MAX_LIST} sizes in [1, 65536]"),
    ("model.dropout", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("train.epochs", lambda v: 1 <= v <= 100000, "an integer in [1, 100000]"),
    ("train.batch_size", lambda v: 1 <= v <= 1 << 20, "an integer in [1, 2^20]"),
    ("train.shards", _is_pow2, "a power of two (1, 2, 4, ...)"),
    ("train.checkpoint_every", lambda v: v >= 0, "an integer >= 0 (0: epoch ends only)"),
    ("optim.name", lambda v: v in ("sgd", "adam"), 'one of "sgd", "adam"'),
    ("optim.lr", lambda v: 0.0 < v < 100.0, "a number in (0, 100)"),
    ("optim.momentum", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim.weight_decay", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim.beta1", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim.beta2", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim.eps", lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"an array of at most {MAX_LIST} {typing.get_args(tp)[0].__name__}"
    return {int: "an integer (64-bit)", float: "a number", str: "a string"}[tp]


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as ``tp`` or raise TypeError. bool is never a number."""
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST:
            raise TypeError  # bounded before any element is looked at
        return tuple(_coerce(v, inner) for v in value)
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int) and not -_INT_BOUND <= value < _INT_BOUND:
        raise TypeError  # beyond 64 bits: no array, file or RNG key could hold it
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise TypeError
    return value


def _short(value: Any) -> str:
    """repr(value), cut to 80 characters (a value may be megabytes long)."""
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{', '.join(map(repr, value[:4]))}, ... ({len(value)} entries)]"
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> Any:
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
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a table, found {type(value).__name__}")
            else:
                kwargs[name] = _build(tp, value, key + ".", problems)
            continue
        try:
            kwargs[name] = _coerce(value, tp)
        except TypeError:
            problems.append(f"{key}: expected {_type_name(tp)}, found {_short(value)} "
                            f"({type(value).__name__})")
    return cls(**kwargs)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check(cfg: Config, problems: list[str]) -> None:
    mistyped = {p.split(":", 1)[0] for p in problems}
    for key, ok, expected in _RANGES:
        if key in mistyped:
            continue  # already reported; its value here is the default
        value = _get(cfg, key)
        if not ok(value):
            problems.append(f"{key}: expected {expected}, found {_short(value)}")
    t = cfg.train
    if _is_pow2(t.shards) and t.batch_size % t.shards:
        problems.append(f"train.batch_size: expected a multiple of train.shards={t.shards}, "
                        f"found {t.batch_size}")
    if cfg.model.arch == "cnn" and cfg.model.dropout != 0.0:
        problems.append(f"model.dropout: the cnn has no dropout sites, expected 0.0, "
                        f"found {cfg.model.dropout}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "mode=exact"]`` -> nested dict of TOML values."""
    nested: dict[str, Any] = {}
    for item in overrides:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ConfigError("<overrides>", [f"{item!r}: expected key=value"])
        try:
            value = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            value = v  # a bare word is taken as a string: mode=exact
        except RecursionError:
            raise ConfigError("<overrides>", [f"{k}: value nested too deeply"]) from None
        node = nested
        parts = k.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError("<overrides>", [f"{k}: {p} is not a table"])
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: dict[str, Any], source: str) -> Config:
    """Validate a raw mapping; every problem is reported in one ConfigError."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    _check(cfg, problems)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Load ``path`` (None: built-in defaults) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>" if path is None else str(path)
    if path is not None:
        raw = _read_toml(Path(path), source)
    return config_from_dict(_merge(raw, parse_overrides(list(overrides))), source)


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    """The TOML file at ``path``: a regular file of at most MAX_CONFIG_BYTES
    (checked before parsing), nested at most as deep as Python's parser copes."""
    try:
        text = read_regular(path, MAX_CONFIG_BYTES).decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except OSError as e:  # a directory, FIFO, device, too large, unreadable
        raise ConfigError(source, [f"cannot read the config: {e.strerror or e}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(source, [f"not valid TOML: {e}"]) from None
    except RecursionError:
        raise ConfigError(source, ["not valid TOML: nested too deeply"]) from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["model"]["hidden"] = list(d["model"]["hidden"])
    return d


def canonical_json(obj: Any) -> bytes:
    """The one canonical JSON encoding used for every key and digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def config_sha256(cfg: Config) -> str:
    return hashlib.sha256(canonical_json(config_to_dict(cfg))).hexdigest()

