"""CSV rows to arrays, streamed: the content is read a piece at a time
(pipeline.data.bounded, within the decode's ``Budget``), split into lines,
each line checked against the columns' patterns, and each batch parsed by
NumPy's C parser; memory is the decoded arrays (twice, when the batches are
joined) and one batch, never the text as Python strings.

Columns [start, stop) are the features, one column the label, any other
column is not read. ``"\\n"`` ends a row (``"\\r\\n"`` too); a last row may
lack it. With ``header = true`` the first line is a header and never read,
and a first line that parses as data is refused (the first example would be
dropped silently); without it, a first line that fails and looks like a header
says so.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..core.errors import DataIntegrityError
from .bounded import Content

__all__ = ["decode_csv", "integers"]

_INT = r"[+-]?[0-9]{1,18}"  # at most 18 digits: always fits int64
_DEC = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_ANY = r"[^,]*"  # a column that is neither a feature nor the label is not read
_MEANS = {_INT: "an integer (at most 18 digits)", _DEC: "a decimal number", _ANY: "a field"}
MAX_LINE = 16 << 20  # bytes: a longer line is refused, not buffered


def integers(spec: Mapping[str, Any]) -> bool:
    """Whether the features are integers: ``values = "integer"``, the default
    where a ``value_range`` is given (``values = "real"`` takes decimals)."""
    return spec.get("values", "integer" if "value_range" in spec else "real") == "integer"


def _columns(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, pattern) of each column of a row, in order."""
    (start, stop), label = spec["features"], spec["label"]
    feature = _INT if integers(spec) else _DEC
    return [("feature", feature) if start <= c < stop else ("label", _INT) if c == label
            else ("unused", _ANY) for c in range(max(stop, label + 1))]


def _looks_like_header(line: str, spec: Mapping[str, Any]) -> bool:
    """The row's fields fit, and a feature or label field is a word, not a number."""
    fields = line.split(",")
    return len(fields) == len(_columns(spec)) and any(
        re.search(r"[A-Za-z_]", s) and not re.fullmatch(_DEC, s)
        for (role, _), s in zip(_columns(spec), fields) if role != "unused")


@np.errstate(over="ignore")  # overflow to inf is what the last check finds
def _row_error(where: str, line: str, spec: Mapping[str, Any], first: bool = False
               ) -> DataIntegrityError:
    """The error for the first bad field of a bad row (called only for bad rows)."""
    cols, fields = _columns(spec), line.split(",")
    hint = ("line 1 looks like a header: if it is one, set header = true"
            if first and not spec.get("header", False) and _looks_like_header(line, spec) else "")
    if len(fields) != len(cols):
        return DataIntegrityError(where, f"{len(cols)} comma-separated fields",
                                  f"{len(fields)} fields", hint)
    lo, hi = spec.get("value_range", (-math.inf, math.inf))
    divisor = np.float32(spec.get("divisor", 1))
    for c, ((role, pat), s) in enumerate(zip(cols, fields)):
        if not re.fullmatch(pat, s):
            want = _MEANS[pat]
            if pat == _INT and role == "feature" and re.fullmatch(_DEC, s):
                hint = hint or ('the features are integers (value_range without values = '
                                '"real"); for real-valued columns set values = "real"')
        elif role == "label" and not 0 <= int(s) < spec["classes"]:
            want = f"in 0..{spec['classes'] - 1}"
        elif role == "feature" and not lo <= (int(s) if pat == _INT else float(s)) <= hi:
            want = f"in {lo}..{hi} (value_range)"
        elif role == "feature" and not np.isfinite(np.float32(float(s)) / divisor):
            want = "finite in float32 after dividing by the divisor"
        else:
            continue
        return DataIntegrityError(where, f"column {c} ({role}): {want}", repr(s), hint)
    raise AssertionError("_row_error called on a good row")


def _lines(content: Content) -> Iterator[list[str]]:
    """The content's lines, a batch per piece read: without their "\\n" (and a
    "\\r" before it); a last line without one comes alone, at the end."""
    carry, seen = b"", 0
    for piece in content.chunks():
        lines = (carry + piece).split(b"\n")
        carry = lines.pop()
        seen += len(lines)
        if len(carry) > MAX_LINE:
            raise DataIntegrityError(f"{content.where}:{seen + 1}", f"a row of at most "
                                     f"{MAX_LINE} bytes", "a longer one (no newline)")
        yield [(b[:-1] if b.endswith(b"\r") else b).decode("latin-1") for b in lines]
    if carry:  # latin-1: every byte is one character, so a non-ASCII byte reaches the check
        yield [carry.decode("latin-1")]


def _parse(rows: list[str], first: int, spec: Mapping[str, Any], where: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, F) float32, labels (n,) int64) of checked ``rows``, which are the
    file's lines ``first + 1`` on."""
    good = re.compile(",".join(pat for _, pat in _columns(spec)))
    for i, line in enumerate(rows):
        if not good.fullmatch(line):
            raise _row_error(f"{where}:{first + i + 1}", line, spec, first + i == 0)
    start, stop = spec["features"]
    # loadtxt's C parser is ~5x faster than int() per field and reads only checked text;
    # integers parse exactly as int64 (18 digits at most), decimals as float64.
    table = np.loadtxt(io.StringIO("\n".join(rows)), delimiter=",", comments=None, ndmin=2,
                       dtype=np.int64 if integers(spec) else np.float64,
                       usecols=[*range(start, stop), spec["label"]])  # (n, F + 1)
    feats, labels = table[:, :-1], table[:, -1]
    lo, hi = spec.get("value_range", (-np.inf, np.inf))
    with np.errstate(over="ignore"):  # overflow to inf is a bad row, found below
        x = feats.astype(np.float32) / np.float32(spec.get("divisor", 1))  # (n, F)
    bad = (labels < 0) | (labels >= spec["classes"]) | ((feats < lo) | (feats > hi)).any(axis=1)
    if (bad := bad | ~np.isfinite(x).all(axis=1)).any():
        i = int(np.argmax(bad))
        raise _row_error(f"{where}:{first + i + 1}", rows[i], spec, first + i == 0)
    return x, labels.astype(np.int64)


def _header(line: str, spec: Mapping[str, Any], where: str) -> None:
    """A declared header must not parse as data: it would be a dropped example."""
    if re.fullmatch(",".join(pat for _, pat in _columns(spec)), line):
        raise DataIntegrityError(f"{where}:1", "a header line (header = true)",
                                 f"a row that parses as data: {line[:80]!r}",
                                 "its example would be dropped; if the file has no header, "
                                 "set header = false")


def decode_csv(content: Content, spec: Mapping[str, Any]
               ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(x (n, *shape) float32, y (n,) int64, shape) of the CSV ``content``."""
    xs, ys, line = [], [], 0
    for rows in _lines(content):
        first, line = line, line + len(rows)
        if first == 0 and rows and spec.get("header", False):
            _header(rows[0], spec, content.where)
            rows, first = rows[1:], 1  # a header line is never read
        if rows:
            x, y = _parse(rows, first, spec, content.where)
            xs.append(x)
            ys.append(y)
    n = sum(len(y) for y in ys)
    if n == 0 or n != spec.get("rows", n):
        raise DataIntegrityError(content.where, f"{spec.get('rows', 'at least 1')} data rows",
                                 f"{n}")
    start, stop = spec["features"]
    shape = tuple(spec.get("shape", [stop - start]))
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    return x.reshape(n, *shape), np.concatenate(ys), shape
