"""Decoders per data format: pure functions from verified files to NumPy arrays.

A decode spec (a JSON object) names a ``format`` in ``FORMATS`` and the manifest files
it reads: ``spec_problems`` checks its schema, ``decode`` decodes it. Nothing here
unpickles: no file is read by ``np.load`` without ``allow_pickle=False``, and npy
headers are parsed as literals (pipeline.data.mapped). The inputs of npy and uncompressed
IDX files are memory-mapped, not read (``maps``): their ``Decoded.x`` is a
``pipeline.data.mapped.Rows``, converted row by row as the in-memory decode converts all.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..core.errors import ConfigError, DataIntegrityError
from ..core.safeio import describe, open_regular
from .mapped import IDX_TYPES, Rows, check_finite, map_idx, map_npy, to_float32
from .schema import FORMATS, files_of, spec_problems

__all__ = ["FORMATS", "Decoded", "spec_problems", "files_of", "decode", "maps"]


# eq=False: arrays have no truth value, so field-wise == and hash() would fail.
@dataclass(frozen=True, eq=False)
class Decoded:
    """Decoded arrays. Classification: ``x`` (n, *input_shape) float32 (in memory,
    or ``Rows`` read from a map), ``y`` (n,) int64 in [0, n_classes). Language
    modelling (text): ``x`` tokens (T,) int64 in [0, n_classes), ``y`` None,
    ``input_shape`` (); ``vocabulary`` holds the characters (token id = index) for
    ``"chars"``, else None."""

    x: np.ndarray | Rows
    y: np.ndarray | None
    input_shape: tuple[int, ...]
    n_classes: int
    vocabulary: tuple[str, ...] | None


def maps(spec: Mapping[str, Any]) -> bool:
    """Whether ``spec``'s inputs are memory-mapped: npy, and IDX without compression."""
    return spec["format"] == "npy" or (spec["format"] == "idx"
                                       and spec.get("compression", "none") == "none")


def _read(path: Path, compression: str) -> bytes:
    """The file's bytes, gunzipped when ``compression`` is "gzip"."""
    blob = Path(path).read_bytes()
    try:
        return gzip.decompress(blob) if compression == "gzip" else blob
    except (OSError, EOFError, zlib.error) as e:
        raise DataIntegrityError(str(path), "gzip data", f"{type(e).__name__}: {e}") from e


def _classified(x_raw: np.ndarray, y_raw: np.ndarray, x_at: str, y_at: str,
                spec: Mapping[str, Any], x_file: BinaryIO | None = None) -> Decoded:
    """Check raw x and y against each other and the spec, then convert them; with
    ``x_file`` (x is mapped from it) x's values are converted and checked only when
    its rows are read (``Rows.chunks``), and y (small) is read into memory."""
    if x_raw.dtype.kind not in "biuf" or x_raw.ndim < 1 or len(x_raw) == 0:
        raise DataIntegrityError(x_at, "a numeric (bool/int/uint/float) array of >= 1 "
                                 "examples", f"dtype {x_raw.dtype}, shape {x_raw.shape}")
    if y_raw.dtype.kind not in "iu" or y_raw.ndim != 1:
        raise DataIntegrityError(y_at, "a 1-D integer array of labels",
                                 f"dtype {y_raw.dtype}, shape {y_raw.shape}")
    if len(y_raw) != len(x_raw):
        raise DataIntegrityError(y_at, f"{len(x_raw)} labels (one per example in {x_at})",
                                 f"{len(y_raw)} labels")
    if (bad := (y_raw < 0) | (y_raw >= spec["classes"])).any():
        i = int(np.argmax(bad))
        raise DataIntegrityError(y_at, f"labels in 0..{spec['classes'] - 1}",
                                 f"{y_raw[i]} at index {i}")
    divisor = spec.get("divisor", 1)
    if x_file is not None:
        x: np.ndarray | Rows = Rows.mapped(x_raw, divisor, x_at, x_file)
    else:
        x = to_float32(x_raw, divisor)  # f32(value) / f32(divisor), as csv does
        check_finite(x, x_at)
    return Decoded(x=x, y=np.array(y_raw, dtype=np.int64), input_shape=tuple(x_raw.shape[1:]),
                   n_classes=spec["classes"], vocabulary=None)


def _open(path: Path) -> BinaryIO:
    try:
        return open_regular(path)
    except OSError as e:  # missing, a FIFO or device, unreadable
        raise DataIntegrityError(str(path), "a readable regular file", describe(e)) from e


def _decode_pair(spec: Mapping[str, Any], paths: Mapping[str, Path],
                 opened: Mapping[str, BinaryIO]) -> Decoded:
    """x and y each from its own file (npy, idx): mapped from ``opened`` (or from
    files opened here), except gzip'd IDX, which is decompressed into memory."""
    names, where = (spec["x"], spec["y"]), (str(paths[spec["x"]]), str(paths[spec["y"]]))
    if not maps(spec):
        x_raw, y_raw = (_load_idx(paths[n], spec["compression"]) for n in names)
        return _classified(x_raw, y_raw, *where, spec)
    mapper = map_npy if spec["format"] == "npy" else map_idx
    with contextlib.ExitStack() as own:  # closes only what it opened; Rows keeps a dup
        files = {n: opened[n] if n in opened else own.enter_context(_open(paths[n]))
                 for n in names}
        x_raw, y_raw = mapper(files[names[0]], where[0]), mapper(files[names[1]], where[1])
        return _classified(x_raw, y_raw, *where, spec, files[names[0]])


_INT = r"[+-]?[0-9]{1,18}"  # at most 18 digits: always fits int64
_DEC = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_ANY = r"[^,]*"  # a column that is neither a feature nor the label is not read
_MEANS = {_INT: "an integer (at most 18 digits)", _DEC: "a decimal number", _ANY: "a field"}


def _csv_columns(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, pattern) of each column of a row, in order."""
    (start, stop), label = spec["features"], spec["label"]
    feature = _INT if "value_range" in spec else _DEC
    return [("feature", feature) if start <= c < stop else ("label", _INT) if c == label
            else ("unused", _ANY) for c in range(max(stop, label + 1))]


@np.errstate(over="ignore")  # overflow to inf is what the last check finds
def _csv_row_error(where: str, line: str, spec: Mapping[str, Any]) -> DataIntegrityError:
    """The error for the first bad field of a bad row (called only for bad rows)."""
    cols, fields = _csv_columns(spec), line.split(",")
    if len(fields) != len(cols):
        return DataIntegrityError(where, f"{len(cols)} comma-separated fields",
                                  f"{len(fields)} fields")
    lo, hi = spec.get("value_range", (0, 0))  # read only for integer features
    divisor = np.float32(spec.get("divisor", 1))
    for c, ((role, pat), s) in enumerate(zip(cols, fields)):
        if not re.fullmatch(pat, s):
            want = _MEANS[pat]
        elif role == "label" and not 0 <= int(s) < spec["classes"]:
            want = f"in 0..{spec['classes'] - 1}"
        elif role == "feature" and pat == _INT and not lo <= int(s) <= hi:
            want = f"in {lo}..{hi}"
        elif role == "feature" and not np.isfinite(np.float32(float(s)) / divisor):
            want = "finite in float32 after dividing by the divisor"
        else:
            continue
        return DataIntegrityError(where, f"column {c} ({role}): {want}", repr(s))
    raise AssertionError("_csv_row_error called on a good row")


def _decode_csv(spec: Mapping[str, Any], paths: Mapping[str, Path]) -> Decoded:
    """CSV rows: columns [start, stop) are the features, reshaped to ``shape``; one label."""
    path = paths[spec["file"]]
    # latin-1 maps every byte to one character, so a non-ASCII byte reaches the row check
    text = _read(path, spec.get("compression", "none")).decode("latin-1")
    rows = text.replace("\r\n", "\n").removesuffix("\n").split("\n")  # "\n" ends a row
    skip = 1 if spec.get("header", False) else 0  # a header line is never read
    rows = rows[skip:] if rows != [""] else []
    good = re.compile(",".join(pat for _, pat in _csv_columns(spec)))
    for i, line in enumerate(rows):
        if not good.fullmatch(line):
            raise _csv_row_error(f"{path}:{i + 1 + skip}", line, spec)
    if not rows or len(rows) != spec.get("rows", len(rows)):
        raise DataIntegrityError(str(path), f"{spec.get('rows', 'at least 1')} data rows",
                                 f"{len(rows)}")
    start, stop = spec["features"]
    # loadtxt's C parser is ~5x faster than int() per field and reads only checked text;
    # integers parse exactly as int64 (18 digits at most), decimals as float64.
    table = np.loadtxt(io.StringIO("\n".join(rows)), delimiter=",", comments=None, ndmin=2,
                       dtype=np.int64 if "value_range" in spec else np.float64,
                       usecols=[*range(start, stop), spec["label"]])  # (n, F + 1)
    feats, labels = table[:, :-1], table[:, -1]
    lo, hi = spec.get("value_range", (-np.inf, np.inf))
    with np.errstate(over="ignore"):  # overflow to inf is a bad row, found below
        x = feats.astype(np.float32) / np.float32(spec.get("divisor", 1))  # (n, F)
    bad = (labels < 0) | (labels >= spec["classes"]) | ((feats < lo) | (feats > hi)).any(axis=1)
    if (bad := bad | ~np.isfinite(x).all(axis=1)).any():
        i = int(np.argmax(bad))
        raise _csv_row_error(f"{path}:{i + 1 + skip}", rows[i], spec)
    shape = tuple(spec.get("shape", [stop - start]))
    return Decoded(x=x.reshape(len(rows), *shape), y=labels.astype(np.int64),
                   input_shape=shape, n_classes=spec["classes"], vocabulary=None)


_NO_PICKLE = "a NumPy array without Python objects (pickles are never loaded)"
_NP_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile)  # ValueError: pickle refused


def _decode_npz(spec: Mapping[str, Any], paths: Mapping[str, Path]) -> Decoded:
    """One .npz archive holding the arrays the spec's ``x`` and ``y`` name."""
    path, keys = paths[spec["file"]], (spec["x"], spec["y"])
    try:
        z = np.load(path, allow_pickle=False)
        if isinstance(z, np.ndarray):
            raise ValueError("a single .npy array, not an .npz archive")
        with z:
            if missing := [k for k in keys if k not in z.files]:
                raise KeyError(f"no array {missing[0]!r}; arrays {z.files}")
            x, y = z[keys[0]], z[keys[1]]
    except (KeyError, *_NP_ERRORS) as e:
        raise DataIntegrityError(str(path), f"an .npz archive holding arrays {list(keys)}, "
                                 "without Python objects", f"{type(e).__name__}: {e}") from e
    return _classified(x, y, f"{path}[{keys[0]}]", f"{path}[{keys[1]}]", spec)


def _load_idx(path: Path, compression: str) -> np.ndarray:
    """One gzip'd IDX file, decompressed into memory: magic (0, 0, type, ndim), ndim
    big-endian uint32 dims, then the data (pipeline.data.mapped maps an uncompressed one)."""
    blob = _read(path, compression)
    if len(blob) < 4 or blob[:2] != b"\0\0" or blob[2] not in IDX_TYPES or blob[3] == 0:
        raise DataIntegrityError(str(path), "IDX magic 00 00, a type byte (08 09 0b 0c 0d 0e), "
                                 "ndim >= 1", f"bytes {blob[:4].hex(' ')!r}")
    ndim, dtype = blob[3], IDX_TYPES[blob[2]]
    head = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", blob[4:head]) if len(blob) >= head else ()
    want = head + math.prod(dims) * dtype.itemsize if dims else head
    if len(blob) != want or not dims:
        why = "truncated" if len(blob) < want else "trailing bytes"
        raise DataIntegrityError(str(path), f"{want} bytes (header {head} + dims {dims} x "
                                 f"{dtype.itemsize} bytes)", f"{len(blob)} bytes ({why})")
    return np.frombuffer(blob, dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def _decode_text(spec: Mapping[str, Any], paths: Mapping[str, Path]) -> Decoded:
    """A token stream: raw bytes (256 classes) or UTF-8 characters (sorted vocabulary)."""
    path = paths[spec["file"]]
    blob = _read(path, spec.get("compression", "none"))
    vocabulary: tuple[str, ...] | None = None
    if spec["vocabulary"] == "bytes":
        tokens, n_classes = np.frombuffer(blob, np.uint8).astype(np.int64), 256
    else:
        try:
            text = blob.decode("utf-8")  # strict: refuses surrogates and overlong forms too
        except UnicodeDecodeError as e:
            raise DataIntegrityError(str(path), "UTF-8 text", f"invalid byte 0x{blob[e.start]:02x}"
                                     f" at byte offset {e.start} ({e.reason})") from e
        codes = np.frombuffer(text.encode("utf-32-le"), "<u4")  # (T,) code points
        points = np.unique(codes)  # sorted by code point
        tokens = np.searchsorted(points, codes).astype(np.int64)  # (T,)
        vocabulary, n_classes = tuple(map(chr, points.tolist())), len(points)
    if len(tokens) < 2:  # one input token and its next-token target at least
        raise DataIntegrityError(str(path), "at least 2 tokens", f"{len(tokens)}")
    return Decoded(x=tokens, y=None, input_shape=(), n_classes=n_classes, vocabulary=vocabulary)


_DECODERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Path]], Decoded]] = {
    "csv": _decode_csv, "npz": _decode_npz, "text": _decode_text,
}


def decode(spec: Mapping[str, Any], paths: Mapping[str, Path],
           opened: Mapping[str, BinaryIO] | None = None) -> Decoded:
    """Decode per ``spec``; ``paths`` maps each name in files_of(spec) to the file on disk
    (already verified against the manifest by the caller); ``opened``: descriptors of
    those files to map from (npy, idx; pipeline.data.dataset passes the ones it checked
    against verification), else the files are opened here. Raises DataIntegrityError
    naming the file (path, and line/row/byte offset where it applies), what was expected
    and found; ConfigError if ``spec`` has schema problems (``spec_problems``)."""
    if problems := spec_problems(spec, "spec", list(paths)):
        raise ConfigError("decode spec", [f"{k}: expected {e}, found {f}" for k, e, f in problems])
    if spec["format"] in ("npy", "idx"):
        return _decode_pair(spec, paths, opened or {})
    return _DECODERS[spec["format"]](spec, paths)
