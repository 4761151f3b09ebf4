"""``pipeline predict RUN_DIR FILE``: predictions of a run's model for an input
file, one JSON object a line.

Inputs are raw, as the run's data files hold them, and go through the run's
own decoding (its decode spec), so the model sees what it was trained on:
- classification: ``.npy`` (an array ``(N, *input_shape)`` or ``(N, F)``;
  never unpickled) or ``.csv`` (N rows of F comma-separated numbers, no label,
  no header); each value becomes ``float32(value) / float32(divisor)`` as the
  dataset decodes it, and must lie in the spec's ``value_range`` if it has one
  (raw digits pixels are 0..16, divided by 16). Output per row:
  ``{"row", "class", "probability"}``.
- images (a run on an ``images`` dataset): an image file, or a folder of
  them (every image under it, in path order), decoded as the run's images
  were (its size, channels, divisor) by the run's Pillow and codecs (another
  decoder is refused); output per image: ``{"file", "row", "class", "name",
  "probability"}``.
- language model: a text file, tokenised with the run's vocabulary (UTF-8
  characters, or bytes) or its tokenizer file (checked against the run's
  sha256); a character the vocabulary or tokenizer lacks is an error naming
  its position. The text is cut into windows of ``data.context`` tokens as in
  training (the last window ends at the text's end); output per position
  ``t``: ``{"position", "token", "next", "probability"}``, the most likely
  token to follow ``t`` given the tokens before it in its window.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..core import usercode
from ..core.errors import DataIntegrityError, UsageError
from ..core.safeio import GIB, read_regular
from ..data.delimited import FEATURE_PATTERNS, integers
from .model import Model

__all__ = ["predict_file", "read_inputs", "MAX_INPUT_BYTES"]

MAX_INPUT_BYTES = 2 * GIB
_BATCH = 256


def predict_file(model: Model, path: Path, out: TextIO) -> int:
    """Write ``model``'s predictions for ``path`` to ``out``; the number of lines."""
    spec = model.record.data["train"]
    if spec.get("format") == "images":
        files, x = read_images(model, Path(path))
        late = usercode.LateImports()
        lines = [{"file": f, **line, "name": spec["classes"][line["class"]]}
                 for f, line in zip(files, _class_lines(model, x))]
    else:
        x = read_inputs(model, Path(path))
        late = usercode.LateImports()
        lines = list(_lm_lines(model, x) if model.shapes.task.windows
                     else _class_lines(model, x))
    late.check("predicting")  # before a line is written: code the run's key never covered
    for line in lines:
        out.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")
    return len(lines)


def read_images(model: Model, path: Path) -> tuple[list[str], np.ndarray]:
    """(the files, their inputs) of an image file or a folder of them (every
    image file under it, in path order), decoded as the run's images part
    decodes (its size, channels, divisor). The decoder is the run's: loading
    the model compared run.json's ``data.decoder`` with this machine's
    (pipeline.inference.loading), so another Pillow or codec never gets here."""
    from ..data import images

    spec = model.record.data["train"]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if images.is_image(p.name) and p.is_file())
        if not files:
            raise DataIntegrityError(str(path), "image files (.png, .jpg, .jpeg, .webp)",
                                     "none")
    elif images.is_image(path.name):
        files = [path]
    else:
        raise UsageError(f"{path}: expected an image file (.png, .jpg, .jpeg, .webp) or a "
                         f"folder of them, found {path.suffix or 'no suffix'!r}")
    x = images.decode_files(files, spec)
    if x.shape[1:] != tuple(model.shapes.input_shape):
        raise DataIntegrityError(str(files[0]), f"an image of the run's input shape "
                                 f"{tuple(model.shapes.input_shape)} (C, H, W)",
                                 f"{tuple(x.shape[1:])}", 'the run\'s decode spec has no '
                                 '"size": give images of its size')
    return [str(f) for f in files], x


def read_inputs(model: Model, path: Path) -> np.ndarray:
    """The file's inputs decoded as the run's dataset decodes: float32 rows
    ``(N, *input_shape)``, or int64 tokens ``(T,)`` for a language model."""
    try:
        blob = read_regular(path, MAX_INPUT_BYTES)
    except OSError as e:
        raise DataIntegrityError(str(path), "a readable input file (a regular file)",
                                 e.strerror or str(e)) from None
    spec = model.record.data["train"]
    if model.shapes.task.windows:
        return _tokens(blob, spec, model, path)
    if path.suffix == ".npy":
        raw = _npy(blob, path)
    elif path.suffix == ".csv":
        raw = _csv(blob, path, spec)
    else:
        raise UsageError(f"{path}: expected a .npy or .csv file of inputs, found "
                         f"{path.suffix or 'no suffix'!r}")
    x = _rows(raw, spec, model.shapes.input_shape, path)
    st = model.standardizer  # the run's inputs were standardised: these are too
    return st.apply(x, str(path)) if st is not None else x


def _npy(blob: bytes, path: Path) -> np.ndarray:
    try:
        a = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # ValueError: a pickled array, refused
        raise DataIntegrityError(str(path), "a .npy array of numbers (never unpickled)",
                                 f"{type(e).__name__}: {e}") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf" or a.ndim < 1:
        raise DataIntegrityError(str(path), "a numeric array (N, ...)",
                                 f"dtype {getattr(a, 'dtype', '?')}")
    return a


def _csv(blob: bytes, path: Path, spec: dict[str, Any]) -> np.ndarray:
    """Rows of comma-separated numbers, each field what the training data's
    decode takes (pipeline.data.delimited: an integer where the run's CSV
    features are integers, parsed as int64, else a decimal), so a value is
    converted to float32 as training converted it."""
    ints = spec.get("format") == "csv" and integers(spec)
    field = re.compile(FEATURE_PATTERNS[ints])
    if blob.startswith(b"\xef\xbb\xbf"):
        raise DataIntegrityError(str(path), "rows of comma-separated numbers",
                                 "a UTF-8 byte-order mark at the start", "save it without one")
    lines = blob.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    rows: list[list[str]] = []
    for i, line in enumerate(lines):
        text = (line[:-1] if line.endswith(b"\r") else line).decode("latin-1")
        fields = text.split(",")
        bad = next((f for f in fields if not field.fullmatch(f)), None)
        if bad is not None or (rows and len(fields) != len(rows[0])):
            want = (f"{len(rows[0])} fields" if bad is None else
                    "an integer (at most 18 digits)" if ints else "a decimal number")
            raise DataIntegrityError(f"{path}:{i + 1}", f"rows of comma-separated numbers (no "
                                     f"header, no label), each field {want}",
                                     repr(bad if bad is not None else text)[:80])
        rows.append(fields)
    if not rows:
        raise DataIntegrityError(str(path), "at least one row of numbers", "no rows")
    return np.array(rows, dtype=np.int64 if ints else np.float64)


def _rows(raw: np.ndarray, spec: dict[str, Any], shape: tuple[int, ...],
          path: Path) -> np.ndarray:
    """``raw`` (N, ...) checked against the spec's range, divided, reshaped."""
    n, width = len(raw), math.prod(shape)
    if raw.size != n * width or n == 0:
        raise DataIntegrityError(str(path), f"N rows of {width} values (an input of shape "
                                 f"{shape})", f"an array of shape {raw.shape}")
    integral = spec.get("format") == "csv" and integers(spec)
    if "value_range" in spec or integral:
        lo, hi = spec.get("value_range", (-math.inf, math.inf))
        flat = raw.reshape(n, -1)
        ok = (flat >= lo) & (flat <= hi) & ((flat == np.round(flat)) if integral else True)
        bad = ~ok.all(axis=1)
        if bad.any():
            kind, i = "integer" if integral else "real", int(np.argmax(bad))
            raise DataIntegrityError(str(path), f"raw {kind} values in {lo}..{hi} as the "
                                     f"training data holds them (they are divided by "
                                     f"{spec.get('divisor', 1)} here)",
                                     f"row {i}: {flat[i].tolist()}"[:160])
    with np.errstate(over="ignore"):
        x = np.asarray(raw, np.float32) / np.float32(spec.get("divisor", 1))
    finite = np.isfinite(x.reshape(n, -1)).all(axis=1)
    if not finite.all():
        raise DataIntegrityError(str(path), "finite values", f"row {int(np.argmin(finite))}")
    return x.reshape(n, *shape)


def _tokens(blob: bytes, spec: dict[str, Any], model: Model, path: Path) -> np.ndarray:
    """Token ids of a text file in the run's vocabulary (chars or bytes), or
    through the run's tokenizer file (its sha256 the run's)."""
    if model.shapes.tokenizer is not None:
        tokens = _tokenized(blob, model.shapes.tokenizer, path, model.shapes.num_classes)
    elif spec.get("vocabulary") == "bytes":
        tokens = np.frombuffer(blob, np.uint8).astype(np.int64)
    else:
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataIntegrityError(str(path), "UTF-8 text",
                                     f"invalid byte at offset {e.start}") from None
        index = {c: i for i, c in enumerate(model.shapes.vocabulary or ())}
        missing = next((i for i, c in enumerate(text) if c not in index), None)
        if missing is not None:
            raise DataIntegrityError(str(path), "characters of the run's vocabulary "
                                     f"({len(index)} characters)",
                                     f"{text[missing]!r} at character {missing}")
        tokens = np.fromiter((index[c] for c in text), np.int64, len(text))
    if len(tokens) < model.context:
        raise DataIntegrityError(str(path), f"at least {model.context} tokens (data.context)",
                                 f"{len(tokens)}")
    return tokens


def _tokenized(blob: bytes, tokenizer: tuple[Path, str], path: Path,
               n_classes: int) -> np.ndarray:
    from ..data import tokenize

    tok_path, sha = tokenizer
    tok = tokenize.load(tok_path, sha)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataIntegrityError(str(path), "UTF-8 text",
                                 f"invalid byte at offset {e.start}") from None
    return tokenize.encode(tok, text, f"{path} (tokenized by {tok_path})", n_classes)


def _probabilities(logits: Any) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    z = logits.double().numpy()
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _class_lines(model: Model, x: np.ndarray) -> Iterator[dict[str, Any]]:
    for i in range(0, len(x), _BATCH):
        p = _probabilities(model.predict(x[i:i + _BATCH]))
        if not np.isfinite(p).all():
            row_at = i + int(np.argmin(np.isfinite(p).all(axis=1)))
            raise DataIntegrityError(f"row {row_at}", "inputs the model gives finite "
                                     "probabilities for", "NaN or inf (an input far outside "
                                     "the training data's range?)")
        for j, row in enumerate(p):
            k = int(row.argmax())
            yield {"row": i + j, "class": k, "probability": float(row[k])}


def _lm_lines(model: Model, tokens: np.ndarray) -> Iterator[dict[str, Any]]:
    """Non-overlapping windows of ``context`` tokens from the start; the last
    window is the text's final ``context`` tokens, of which only the
    positions not yet predicted are written."""
    ctx, vocab = model.context, model.shapes.vocabulary
    starts = list(range(0, len(tokens) - ctx + 1, ctx))
    if starts[-1] + ctx < len(tokens):
        starts.append(len(tokens) - ctx)
    done = 0
    for b in range(0, len(starts), _BATCH):
        batch = starts[b:b + _BATCH]
        windows = np.stack([tokens[s:s + ctx] for s in batch])             # (B, T)
        p = _probabilities(model.predict(windows))                         # (B, T, V)
        for s, rows in zip(batch, p):
            for t in range(max(done - s, 0), ctx):
                k = int(rows[t].argmax())
                yield {"position": s + t, "token": _token(tokens[s + t], vocab),
                       "next": _token(k, vocab), "probability": float(rows[t][k])}
            done = s + ctx


def _token(i: Any, vocab: tuple[str, ...] | None) -> Any:
    return vocab[int(i)] if vocab is not None else int(i)
