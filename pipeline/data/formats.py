"""Decoders per data format: pure functions from verified files to NumPy arrays.

A decode spec (a JSON object) names a ``format`` in ``FORMATS`` and the manifest files
it reads: ``spec_problems`` checks its schema, ``decode`` decodes it. Nothing here
unpickles: no file is read by ``np.load``; npy headers are parsed as literals and npz
members read by pipeline.data.arrays, object dtypes refused. The inputs of npy and
uncompressed IDX files are memory-mapped, not read (``maps``): their ``Decoded.x`` is a
``pipeline.data.mapped.Rows``, converted row by row as the in-memory decode converts all.
Everything else is read into memory within the spec's ``max_bytes`` (pipeline.data.bounded:
counted after decompression, checked against what a header declares before reading),
and csv and text are decoded as they stream (pipeline.data.delimited, pipeline.data.text).
Parquet and Arrow IPC tables are mapped and decoded column by column through pyarrow,
an optional extra (pipeline.data.tables).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..core.errors import ConfigError, DataIntegrityError
from .arrays import read_idx, read_npz
from .bounded import Budget, Content, max_bytes, open_data
from .delimited import decode_csv
from .mapped import Rows, check_finite, map_idx, map_npy, to_float32
from .schema import FORMATS, files_of, spec_problems
from .text import tokens

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


def _decode_pair(spec: Mapping[str, Any], paths: Mapping[str, Path],
                 opened: Mapping[str, BinaryIO]) -> Decoded:
    """x and y each from its own file (npy, idx): mapped from ``opened`` (or from
    files opened here), except gzip'd IDX, which is decompressed into memory."""
    names, where = (spec["x"], spec["y"]), (str(paths[spec["x"]]), str(paths[spec["y"]]))
    if not maps(spec):  # gzip'd IDX, read into memory within the budget
        budget = Budget(max_bytes(spec))
        x_raw, y_raw = (read_idx(paths[n], spec["compression"], budget) for n in names)
        return _classified(x_raw, y_raw, *where, spec)
    mapper = map_npy if spec["format"] == "npy" else map_idx
    with contextlib.ExitStack() as own:  # closes only what it opened; Rows keeps a dup
        files = {n: opened[n] if n in opened else own.enter_context(open_data(paths[n]))
                 for n in names}
        x_raw, y_raw = mapper(files[names[0]], where[0]), mapper(files[names[1]], where[1])
        return _classified(x_raw, y_raw, *where, spec, files[names[0]])


def _decode_csv(spec: Mapping[str, Any], paths: Mapping[str, Path]) -> Decoded:
    """CSV rows: columns [start, stop) are the features, reshaped to ``shape``; one label
    (pipeline.data.delimited)."""
    budget = Budget(max_bytes(spec))
    with Content(paths[spec["file"]], spec.get("compression", "none"), budget,
                 measure=True) as content:
        x, y, shape = decode_csv(content, spec)
    return Decoded(x=x, y=y, input_shape=shape, n_classes=spec["classes"], vocabulary=None)


def _decode_npz(spec: Mapping[str, Any], paths: Mapping[str, Path]) -> Decoded:
    """One .npz archive holding the arrays the spec's ``x`` and ``y`` name, each
    member checked and bounded before it is read (pipeline.data.arrays)."""
    path, keys = paths[spec["file"]], (spec["x"], spec["y"])
    x, y = read_npz(path, keys, Budget(max_bytes(spec)))
    return _classified(x, y, f"{path}[{keys[0]}]", f"{path}[{keys[1]}]", spec)


def _decode_table(spec: Mapping[str, Any], paths: Mapping[str, Path]) -> Decoded:
    """Named columns of a Parquet or Arrow IPC file, memory-mapped (pipeline.data.tables)."""
    from .tables import decode as decode_table  # pyarrow is an optional extra

    x, y, shape = decode_table(spec, paths[spec["file"]])
    return Decoded(x=x, y=y, input_shape=shape, n_classes=spec["classes"], vocabulary=None)


def _decode_text(spec: Mapping[str, Any], paths: Mapping[str, Path]) -> Decoded:
    """A token stream: raw bytes (256 classes), UTF-8 characters (sorted vocabulary),
    or the ids of a tokenizer file (pipeline.data.tokenize; its tokens the vocabulary)."""
    path = paths[spec["file"]]
    if "tokenizer" in spec:
        return _decode_tokenized(spec, path, paths[spec["tokenizer"]])
    with Content(path, spec.get("compression", "none"), Budget(max_bytes(spec)),
                 measure=True) as content:
        x, vocabulary = tokens(content, spec["vocabulary"])
    if len(x) < 2:  # one input token and its next-token target at least
        raise DataIntegrityError(str(path), "at least 2 tokens", f"{len(x)}")
    n_classes = 256 if vocabulary is None else len(vocabulary)
    return Decoded(x=x, y=None, input_shape=(), n_classes=n_classes, vocabulary=vocabulary)


def _decode_tokenized(spec: Mapping[str, Any], path: Path, tok_path: Path) -> Decoded:
    from . import tokenize

    tok = tokenize.load(tok_path)  # before the text: a bad tokenizer is named first
    vocabulary = tokenize.vocabulary(tok, str(tok_path))
    with Content(path, spec.get("compression", "none"), Budget(max_bytes(spec)),
                 measure=True) as content:
        blob = b"".join(content.chunks())
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataIntegrityError(str(path), "UTF-8 text", f"invalid byte 0x{blob[e.start]:02x} "
                                 f"at byte offset {e.start} ({e.reason})") from None
    del blob
    x = tokenize.encode(tok, text, f"{path} (tokenized by {tok_path})", len(vocabulary))
    if len(x) < 2:  # one input token and its next-token target at least
        raise DataIntegrityError(str(path), "at least 2 tokens", f"{len(x)}")
    return Decoded(x=x, y=None, input_shape=(), n_classes=len(vocabulary), vocabulary=vocabulary)


_DECODERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Path]], Decoded]] = {
    "csv": _decode_csv, "npz": _decode_npz, "text": _decode_text,
    "parquet": _decode_table, "arrow": _decode_table,
}


def decode(spec: Mapping[str, Any], paths: Mapping[str, Path],
           opened: Mapping[str, BinaryIO] | None = None) -> Decoded:
    """Decode per ``spec``; ``paths`` maps each name in files_of(spec) to the file on disk
    (already verified against the manifest by the caller); ``opened``: descriptors of
    those files to map from (npy, idx; pipeline.data.dataset passes the ones it checked
    against verification), else the files are opened here. Raises DataIntegrityError
    naming the file (path, and line/row/byte offset where it applies), what was expected
    and found; ConfigError if ``spec`` has schema problems (``spec_problems``). A decode
    this process has no memory for (a ``max_bytes`` raised past it) is a DataIntegrityError
    naming the files, not an internal error."""
    if problems := spec_problems(spec, "spec", list(paths)):
        raise ConfigError("decode spec", [f"{k}: expected {e}, found {f}" for k, e, f in problems])
    try:
        if spec["format"] in ("npy", "idx"):
            return _decode_pair(spec, paths, opened or {})
        return _DECODERS[spec["format"]](spec, paths)
    except MemoryError as e:  # NumPy's allocation failed: nothing was half-made
        where = ", ".join(str(paths[n]) for n in files_of(spec))
        raise DataIntegrityError(where, f"data whose decode fits in memory (max_bytes "
                                 f"{max_bytes(spec)} of content)", f"MemoryError: {e}",
                                 "lower max_bytes, or give the inputs as npy (memory-mapped, "
                                 "not read)") from None
