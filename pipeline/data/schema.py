"""The data manifest's schema (``data-manifest.json``, version 2).

``files``: each data file with its path (relative to the data root), sha256,
size, source, licence and description: what ``pipeline.data.manifest.verify``
checks. ``datasets``: each dataset's task (``classification`` or ``lm``) and
how its ``train`` part (and optional ``test`` part) decode from those files
(pipeline.data.formats: csv, npy, npz, idx, text, images, parquet, arrow).
Every problem is reported by
its dotted key, all together.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from ..core.errors import DataIntegrityError
from . import task
from .task import Task

__all__ = ["FileEntry", "DatasetEntry", "Manifest", "parse", "problems", "reject_duplicates",
           "spec_problems", "files_of", "MANIFEST_VERSION", "FORMATS"]

MANIFEST_VERSION = 2
# decoded by pipeline.data.formats (images: pipeline.data.images)
FORMATS = ("csv", "npy", "npz", "idx", "text", "images", "parquet", "arrow")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS: dict[str, type] = {"path": str, "sha256": str, "size": int, "source": str,
                            "licence": str, "description": str}
_DATASET_KEYS = ("task", "train", "test", "description")


@dataclass(frozen=True)
class FileEntry:
    """One data file as the manifest promises it; ``path`` is relative to the data root."""

    name: str
    path: str
    sha256: str
    size: int
    source: str
    licence: str
    description: str


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset: its task and the decode specs of its parts (pipeline.data.formats)."""

    name: str
    task: Task
    train: dict[str, Any]
    test: dict[str, Any] | None
    description: str = ""
    # part -> the image files under its ``root`` (format images; pipeline.data.images)
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def files(self) -> list[str]:
        """The file names its parts read, train first (an images part: its index,
        then its image files in path order)."""
        names = files_of(self.train) + list(self.members.get("train", ()))
        if self.test:
            names += files_of(self.test) + list(self.members.get("test", ()))
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileEntry]
    datasets: dict[str, DatasetEntry]


def _kind(v: object) -> str:
    return type(v).__name__


def reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json ``object_pairs_hook``: a key given twice is an error, not a silent overwrite."""
    keys = [k for k, _ in pairs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, dups))}")
    return dict(pairs)


def _path_problem(p: str) -> str | None:
    """Why ``p`` is not a plain relative path inside the data root, or None."""
    pp = PurePosixPath(p)
    if pp.is_absolute() or PureWindowsPath(p).anchor or "\\" in p:
        return f"an absolute or non-POSIX path {p!r}"
    if ".." in pp.parts:
        return f"a path escaping the data root {p!r}"
    if pp.parts in ((), (".",)):
        return f"an empty path {p!r}"
    return None


def _file_problems(name: str, raw: object) -> list[tuple[str, str, str]]:
    where = f"files.{name}"
    if not isinstance(raw, dict):
        return [(where, "an object", _kind(raw))]
    probs = [(f"{where}.{k}", "no such key (allowed: " + ", ".join(_FIELDS) + ")",
              "an unknown key") for k in raw if k not in _FIELDS]
    for key, typ in _FIELDS.items():
        v = raw.get(key)
        if key not in raw:
            probs.append((f"{where}.{key}", f"a {typ.__name__}", "nothing (missing key)"))
        elif not isinstance(v, typ) or isinstance(v, bool):
            probs.append((f"{where}.{key}", f"a {typ.__name__}", f"{_kind(v)} {v!r}"))
    if probs:
        return probs
    if not _SHA256.fullmatch(raw["sha256"]):
        probs.append((f"{where}.sha256", "64 lowercase hex digits", repr(raw["sha256"])))
    if (why := _path_problem(raw["path"])) is not None:
        probs.append((f"{where}.path", "a relative path inside the data root", why))
    if raw["size"] < 0:
        probs.append((f"{where}.size", "a non-negative integer", str(raw["size"])))
    return probs


def _dataset_problems(name: str, raw: object, files: dict[str, Any]) -> list[tuple[str, str, str]]:
    where = f"datasets.{name}"
    if not isinstance(raw, dict):
        return [(where, "an object", _kind(raw))]
    probs = [(f"{where}.{k}", f"no such key (allowed: {', '.join(_DATASET_KEYS)})",
              "an unknown key") for k in raw if k not in _DATASET_KEYS]
    if raw.get("task") not in task.TASKS:
        probs.append((f"{where}.task", f"one of {task.TASKS}", repr(raw.get("task"))))
    if "train" not in raw:
        probs.append((f"{where}.train", "a decode spec", "nothing (missing key)"))
    if not isinstance(raw.get("description", ""), str):
        probs.append((f"{where}.description", "a string", _kind(raw["description"])))
    for part in ("train", "test"):
        if part in raw:
            probs += [(k, x, f) for k, x, f in spec_problems(raw[part], f"{where}.{part}",
                                                              list(files))]
    if not probs:  # the task and the format agree
        fits = {task.for_format(raw[p].get("format")) for p in ("train", "test") if p in raw}
        if fits != {task.of(raw["task"])}:
            probs.append((f"{where}.task", "lm exactly when every part has format text",
                          f"task {raw['task']!r} with formats "
                          f"{[raw[p].get('format') for p in ('train', 'test') if p in raw]}"))
    return probs


def problems(raw: object) -> list[tuple[str, str, str]]:
    """Every problem of a manifest (parsed JSON) as (dotted key, expected, found)."""
    if not isinstance(raw, dict):
        return [("(top level)", "an object", _kind(raw))]
    probs = [(k, "only the keys version, files, datasets", "an unknown key")
             for k in raw if k not in ("version", "files", "datasets")]
    v = raw.get("version")
    if type(v) is not int or v != MANIFEST_VERSION:
        probs.append(("version", f"{MANIFEST_VERSION}", repr(v) if "version" in raw else "nothing"))
    files, datasets = raw.get("files"), raw.get("datasets", {})
    if not isinstance(files, dict) or not files:
        return probs + [("files", "a non-empty object", repr(files)[:80])]
    if not isinstance(datasets, dict):
        return probs + [("datasets", "an object", _kind(datasets))]
    for name, entry in files.items():
        probs += _file_problems(name, entry)
    for name, entry in datasets.items():
        probs += _dataset_problems(name, entry, files)
    return probs


def parse(raw: object, source: str) -> Manifest:
    """The manifest in ``raw`` (parsed JSON), or DataIntegrityError naming
    ``source`` and the first problem's key (the others in the hint)."""
    probs = problems(raw)
    if probs:
        key, expected, found = probs[0]
        rest = "; ".join(f"{k}: expected {x}, found {f}" for k, x, f in probs[1:])
        hint = "fix the manifest" + (f"; also {rest}" if rest else "")
        raise DataIntegrityError(f"{source} [{key}]", expected, found, hint)
    assert isinstance(raw, dict)
    files = {n: FileEntry(name=n, **e) for n, e in raw["files"].items()}
    datasets = {n: DatasetEntry(n, task.of(e["task"]), e["train"], e.get("test"),
                                e.get("description", ""), _members(e, files))
                for n, e in raw.get("datasets", {}).items()}
    return Manifest(files, datasets)


def _members(dataset: dict[str, Any], files: dict[str, FileEntry]) -> dict[str, tuple[str, ...]]:
    """part -> the file entries an images part reads: every entry whose path lies
    under its ``root`` and ends in an image extension, in path order."""
    from .images import members  # no NumPy or Pillow: a path filter

    return {p: members(dataset[p]["root"], files) for p in ("train", "test")
            if isinstance(dataset.get(p), dict) and dataset[p].get("format") == "images"}


# --- decode specs (pipeline.data.formats decodes them) ----------------------------

def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is never a number


def _ints(v: object, n: int | None = None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(map(_int, v))


def _number(v: object) -> bool:
    return _int(v) or (isinstance(v, float) and math.isfinite(v))


def _divisor(v: Any, _: object) -> bool:
    """A number > 0 that stays finite and non-zero in float32 (the division is f32)."""
    if not (_int(v) or isinstance(v, float)):
        return False
    try:
        f32 = struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:  # beyond float32's range
        return False
    return bool(0 < f32 < math.inf)


# kind -> (what a value must be, its check given the manifest's file names)
_KINDS: dict[str, tuple[str, Callable[[Any, Collection[str]], bool]]] = {
    "file": ("a manifest file name, one of {names}", lambda v, n: isinstance(v, str) and v in n),
    "key": ("a non-empty string (an array name)", lambda v, _: isinstance(v, str) and v != ""),
    "compression": ('"none" or "gzip"', lambda v, _: v in ("none", "gzip")),
    "vocabulary": ('"chars" or "bytes"', lambda v, _: v in ("chars", "bytes")),
    "bool": ("true or false", lambda v, _: isinstance(v, bool)),
    "count": ("an integer >= 1", lambda v, _: _int(v) and v >= 1),
    "column": ("an integer >= 0 (a column index)", lambda v, _: _int(v) and v >= 0),
    "features": ("[start, stop], integers with 0 <= start < stop",
                 lambda v, _: _ints(v, 2) and 0 <= v[0] < v[1]),
    "range": ("[lo, hi], finite numbers with lo <= hi",
              lambda v, _: isinstance(v, list) and len(v) == 2 and all(map(_number, v))
              and v[0] <= v[1]),
    "values": ('"integer" or "real"', lambda v, _: v in ("integer", "real")),
    "shape": ("a non-empty list of integers >= 1",
              lambda v, _: _ints(v) and min(v, default=0) >= 1),
    "divisor": ("a number > 0, finite and non-zero in float32", _divisor),
    "dir": ("a relative directory inside the data root",
            lambda v, _: isinstance(v, str) and (v == "." or _path_problem(v) is None)),
    "names": ("a non-empty list of distinct class names (non-empty strings without '/')",
              lambda v, _: isinstance(v, list) and len(v) >= 1 and len(set(map(str, v))) == len(v)
              and all(isinstance(c, str) and c and "/" not in c and c not in (".", "..")
                      for c in v)),
    "size": ("[height, width], integers in 1..4096",
             lambda v, _: _ints(v, 2) and all(1 <= d <= 4096 for d in v)),
    "channels": ("1 (grey) or 3 (RGB)", lambda v, _: _int(v) and v in (1, 3)),
    "columns": ("a non-empty list of distinct column names (non-empty strings)",
                lambda v, _: isinstance(v, list) and len(v) >= 1
                and all(isinstance(c, str) and c for c in v) and len(set(v)) == len(v)),
    "column_name": ("a column name (a non-empty string)",
                    lambda v, _: isinstance(v, str) and v != ""),
}
_F, _CLASSES, _DIV = ("file", True), ("count", True), ("divisor", False)
_GZ = ("compression", False)
# The most bytes of content a decode reads into memory, after decompression
# (pipeline.data.bounded; default 256 MiB): what bounds a gzip or zip bomb.
_MAX = ("count", False)
_SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {  # format -> key -> (kind, required)
    "csv": {"file": _F, "compression": _GZ, "header": ("bool", False),
            "features": ("features", True), "label": ("column", True), "shape": ("shape", False),
            "value_range": ("range", False), "values": ("values", False), "divisor": _DIV,
            "classes": _CLASSES,
            "rows": ("count", False), "max_bytes": _MAX},
    "npy": {"x": _F, "y": _F, "divisor": _DIV, "classes": _CLASSES},
    "npz": {"file": _F, "x": ("key", True), "y": ("key", True), "divisor": _DIV,
            "classes": _CLASSES, "max_bytes": _MAX},
    "idx": {"x": _F, "y": _F, "compression": _GZ, "divisor": _DIV, "classes": _CLASSES,
            "max_bytes": _MAX},
    # vocabulary (characters or bytes), or a tokenizer file (pipeline.data.tokenize)
    "text": {"file": _F, "vocabulary": ("vocabulary", False), "tokenizer": ("file", False),
             "compression": _GZ, "max_bytes": _MAX},
    # pipeline.data.images: root/<class>/<file>, or an index (csv/json) of path and label
    "images": {"root": ("dir", True), "classes": ("names", True), "index": ("file", False),
               "size": ("size", False), "channels": ("channels", False), "divisor": _DIV,
               "max_pixels": ("count", False)},
}
# pipeline.data.tables: named columns of a Parquet or Arrow IPC (Feather v2) file
_TABLE = {"file": _F, "features": ("columns", True), "label": ("column_name", True),
          "shape": ("shape", False), "value_range": ("range", False), "divisor": _DIV,
          "classes": _CLASSES, "rows": ("count", False), "max_bytes": _MAX}
_SCHEMA.update(parquet=_TABLE, arrow=_TABLE)


def _show(v: object) -> str:
    """A value as JSON spells it, with its Python type (so 1 and true differ)."""
    return f"{json.dumps(v, default=repr)} ({type(v).__name__})"


def _csv_problems(spec: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(key, expected, found) across csv keys, checked once each key alone is valid."""
    if not _ints(feats := spec.get("features"), 2) or not 0 <= feats[0] < feats[1]:
        return []
    (start, stop), label, shape = feats, spec.get("label"), spec.get("shape")
    out = []
    if _int(label) and start <= label < stop:
        out.append(("label", f"a column outside features {start}..{stop - 1}", _show(label)))
    if _ints(shape) and shape and min(shape) >= 1 and math.prod(shape) != stop - start:
        out.append(("shape", f"{stop - start} elements (features [{start}, {stop}])",
                    f"{shape} ({math.prod(shape)} elements)"))
    return out


def _table_problems(spec: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(key, expected, found) across a table's keys: the label is not a feature,
    the shape holds the features."""
    feats, label, shape = spec.get("features"), spec.get("label"), spec.get("shape")
    if not (isinstance(feats, list) and all(isinstance(c, str) for c in feats)):
        return []
    out = []
    if isinstance(label, str) and label in feats:
        out.append(("label", "a column that is not among the features", _show(label)))
    if _ints(shape) and shape and min(shape) >= 1 and math.prod(shape) != len(feats):
        out.append(("shape", f"{len(feats)} elements (one per feature column)",
                    f"{shape} ({math.prod(shape)} elements)"))
    return out


def _text_problems(spec: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Text takes its tokens from exactly one of vocabulary and tokenizer."""
    if ("vocabulary" in spec) == ("tokenizer" in spec):
        found = "both" if "vocabulary" in spec else "neither"
        return [("vocabulary", 'one of "vocabulary" ("chars" or "bytes") or "tokenizer" (a '
                 'tokenizer JSON file of the manifest)', found)]
    if spec.get("tokenizer") is not None and spec.get("tokenizer") == spec.get("file"):
        return [("tokenizer", "a file other than the text's", _show(spec["tokenizer"]))]
    return []


def spec_problems(spec: object, where: str,
                  file_names: Collection[str]) -> list[tuple[str, str, str]]:
    """Schema check of one decode spec: a list of (key, expected, found), empty if fine.

    ``where`` is the dotted key prefix for messages, e.g. "datasets.digits.train";
    ``file_names``: the manifest's file entries, which the spec's file references must
    name. Unknown keys, missing required keys and wrong types are all reported.
    """
    def at(key: object) -> str:
        return f"{where}.{key}" if where else str(key)

    if not isinstance(spec, Mapping):
        return [(where or "spec", "an object of decode keys", _show(spec))]
    fmt = spec.get("format")
    if not (isinstance(fmt, str) and fmt in _SCHEMA):
        return [(at("format"), f"one of {', '.join(FORMATS)}",
                 _show(fmt) if "format" in spec else "missing")]
    schema, names = _SCHEMA[fmt], sorted(file_names)
    problems = [(at(k), f"a key of format {fmt} ({', '.join(schema)})", f"unknown key {_show(v)}")
                for k, v in spec.items() if k != "format" and k not in schema]
    for key, (kind, required) in schema.items():
        expected, ok = _KINDS[kind]
        if (key in spec and not ok(spec[key], names)) or (key not in spec and required):
            problems.append((at(key), expected.format(names=names),
                             _show(spec[key]) if key in spec else "missing"))
    extra = (_csv_problems(spec) if fmt == "csv" else _text_problems(spec) if fmt == "text"
             else _table_problems(spec) if fmt in ("parquet", "arrow") else [])
    return problems + [(at(k), e, f) for k, e, f in extra]


def files_of(spec: Mapping[str, Any]) -> list[str]:
    """The manifest file names a (valid) spec reads, in a fixed order (x before y)."""
    if spec["format"] == "images":  # its image files: DatasetEntry.members
        return [spec["index"]] if "index" in spec else []
    keys = ("x", "y") if spec["format"] in ("npy", "idx") else ("file", "tokenizer")
    return list(dict.fromkeys(spec[k] for k in keys if k in spec))  # once each, even if x and y are one
