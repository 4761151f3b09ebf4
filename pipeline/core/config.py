"""Strict training config: a frozen dataclass tree loaded from one TOML file.

Unknown keys, wrong types and out-of-range values are all collected and
reported together in one ``ConfigError`` naming each key. Overrides are
``section.key=value`` strings whose value is parsed as a TOML value
(``train.epochs=3``, ``model.args.hidden=[64,32]``, ``mode=exact``).

``model.factory`` names the function that builds the network
(``package.module:function``, pipeline.models) and ``[model.args]`` its
keyword arguments: a free table, checked by the factory itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .safeio import MIB, read_regular
from .strict import build, short

__all__ = ["Config", "AugmentConfig", "DataConfig", "ModelConfig", "TrainConfig", "OptimConfig",
           "load_config", "parse_overrides", "config_sha256", "config_to_dict"]


@dataclass(frozen=True)
class AugmentConfig:
    """``[data.augment]``: training inputs transformed per (seed, epoch, example)
    (pipeline.data.augment, docs/reference/augment.md); all off by default."""

    resized_crop_scale: tuple[float, ...] = ()          # [lo, hi] of the area (empty: off)
    resized_crop_ratio: tuple[float, ...] = (0.75, 4.0 / 3.0)  # [lo, hi] of width / height
    crop_padding: int = 0        # random crop after this many zeros on each side (0: off)
    hflip: bool = False          # flip left-right with probability 1/2
    brightness: float = 0.0      # x * f, f uniform in [1 - b, 1 + b] (0: off)
    contrast: float = 0.0        # (x - 0.5) * f + 0.5, f uniform in [1 - c, 1 + c] (0: off)
    transform: str = ""          # "module:function": the user's own, last (pipeline.data.augment)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    test_fraction: float = 0.2   # used when the dataset has no test part of its own
    context: int = 0             # language modelling: tokens per example (0: classification)
    val_fraction: float = 0.0    # of the training examples, held out for validation (0: none)
    standardize: bool = False    # per-column, statistics of the training split (pipeline.data.standardize)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelConfig:
    factory: str = "pipeline.models:mlp"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    max_steps: int = 0           # > 0: stop after this many steps (a shorter run)
    batch_size: int = 64
    # 8 shards: world sizes 1, 2, 4 and 8 all give the same bits (pipeline.train.distributed).
    shards: int = 8
    checkpoint_every: int = 100
    # ... and at least this long after the previous one (or the start): a
    # checkpoint's cost is then at most its write time / this share of training.
    checkpoint_seconds: float = 60.0
    loss: str = "cross_entropy"  # or "module:function" (pipeline.models)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"            # "sgd", "adam" (L2 weight decay) or "adamw" (decoupled)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    nesterov: bool = False       # sgd with momentum > 0 only
    clip_norm: float = 0.0       # > 0: clip the gradients' global norm to this (0: off)
    schedule: str = "constant"   # or "cosine" (pipeline.core.schedule)
    warmup_steps: int = 0        # linear warm-up over this many steps (0: none)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    mode: str = "pinned"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


MAX_CONFIG_BYTES = MIB   # a config file larger than this is refused unparsed
# "package.module:function": dotted identifiers, one colon.
_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
LOSSES = ("cross_entropy",)
MODES = ("pinned", "exact")  # pipeline.modes.of maps each to its Mode
OPTIMISERS = ("sgd", "adam", "adamw")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# (key, predicate, what was expected): checked after types are right.
_RANGES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
    ("mode", lambda v: v in MODES, 'one of "pinned", "exact"'),
    ("data.test_fraction", lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    ("data.val_fraction", lambda v: 0.0 <= v < 1.0, "a number in [0, 1) (0: no validation split)"),
    ("data.context", lambda v: 0 <= v <= 1 << 20, "an integer in [0, 2^20]"),
    ("data.augment.resized_crop_scale", lambda v: v == () or (
        len(v) == 2 and 0.0 < v[0] <= v[1] <= 1.0), "[] (off) or [lo, hi] with 0 < lo <= hi <= 1"),
    ("data.augment.resized_crop_ratio", lambda v: len(v) == 2 and 0.0 < v[0] <= v[1] <= 100.0,
     "[lo, hi] with 0 < lo <= hi <= 100"),
    ("data.augment.crop_padding", lambda v: 0 <= v <= 4096, "an integer in [0, 4096]"),
    ("data.augment.brightness", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("data.augment.contrast", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("data.augment.transform", lambda v: v == "" or _FACTORY.fullmatch(v) is not None,
     '"" (none) or "package.module:function"'),
    ("model.factory", lambda v: _FACTORY.fullmatch(v) is not None,
     '"package.module:function" (dotted Python names)'),
    ("train.epochs", lambda v: 1 <= v <= 100000, "an integer in [1, 100000]"),
    ("train.max_steps", lambda v: 0 <= v < 1 << 40, "an integer in [0, 2^40) (0: no limit)"),
    ("train.batch_size", lambda v: 1 <= v <= 1 << 20, "an integer in [1, 2^20]"),
    ("train.shards", _is_pow2, "a power of two (1, 2, 4, ...)"),
    ("train.checkpoint_every", lambda v: v >= 0, "an integer >= 0 (0: epoch ends only)"),
    ("train.checkpoint_seconds", lambda v: 0.0 <= v <= 1e6, "a number of seconds in [0, 1e6]"),
    ("train.loss", lambda v: _FACTORY.fullmatch(v) is not None or v in LOSSES,
     f'one of {LOSSES} or "module:function"'),
    ("optim.name", lambda v: v in OPTIMISERS, 'one of "sgd", "adam", "adamw"'),
    ("optim.lr", lambda v: 0.0 < v < 100.0, "a number in (0, 100)"),
    ("optim.momentum", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim.weight_decay", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim.beta1", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim.beta2", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim.eps", lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    ("optim.clip_norm", lambda v: 0.0 <= v <= 1e9, "a number in [0, 1e9] (0: no clipping)"),
    ("optim.schedule", lambda v: v in ("constant", "cosine"), 'one of "constant", "cosine"'),
    ("optim.warmup_steps", lambda v: 0 <= v < 1 << 40, "an integer in [0, 2^40) (0: none)"),
]
# Keys added after configs were first hashed: left out of the canonical dict (run
# key, config_sha256, golden keys) at their default, so older configs keep their hash.
_KEYED_WHEN_SET = {("train", "checkpoint_seconds"): 60.0, ("data", "standardize"): False,
                   ("data", "val_fraction"): 0.0,
                   ("data", "augment"): {"resized_crop_scale": [],
                                         "resized_crop_ratio": [0.75, 4.0 / 3.0],
                                         "crop_padding": 0, "hflip": False, "brightness": 0.0,
                                         "contrast": 0.0, "transform": ""},
                   ("optim", "nesterov"): False, ("optim", "clip_norm"): 0.0,
                   ("optim", "schedule"): "constant", ("optim", "warmup_steps"): 0}


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
            problems.append(f"{key}: expected {expected}, found {short(value)}")
    o = cfg.optim
    if o.nesterov and not (o.name == "sgd" and o.momentum > 0):
        problems.append(f"optim.nesterov: expected false unless optim.name = 'sgd' with optim."
                        f"momentum > 0, found true with {o.name!r}, momentum {o.momentum!r}")
    t = cfg.train
    if _is_pow2(t.shards) and t.batch_size % t.shards:
        problems.append(f"train.batch_size: expected a multiple of train.shards={t.shards}, "
                        f"found {t.batch_size}")


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
            if not isinstance(node, dict) or isinstance(node, _Table):
                raise ConfigError("<overrides>", [f"{k}: {p} is not a table"])
        # A table given whole (``model.args={}``, ``model.args={hidden=[64]}``)
        # replaces the config's; dotted keys (``model.args.hidden=[64]``) merge.
        node[parts[-1]] = _Table(value) if isinstance(value, dict) else value
    return nested


class _Table(dict):  # type: ignore[type-arg]
    """A table value given whole in an override: it replaces, never merges."""


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, _Table):
            out[k] = dict(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(raw: dict[str, Any], source: str) -> Config:
    """Validate a raw mapping; every problem is reported in one ConfigError."""
    problems: list[str] = []
    cfg = build(Config, raw, "", problems)
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
    """The config as canonical JSON values, keys of ``_KEYED_WHEN_SET`` left
    out while at their default (``config_from_dict`` restores them)."""
    out = json.loads(canonical_json(dataclasses.asdict(cfg)))
    for (section, key), default in _KEYED_WHEN_SET.items():
        if type(out[section][key]) is type(default) and out[section][key] == default:
            del out[section][key]
    return out


def canonical_json(obj: Any) -> bytes:
    """The one canonical JSON encoding used for every key and digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def config_sha256(cfg: Config) -> str:
    return hashlib.sha256(canonical_json(config_to_dict(cfg))).hexdigest()

