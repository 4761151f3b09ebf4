"""Decoding verified data files into arrays, through a content-addressed cache.

``load`` decodes a file that ``pipeline.manifest.verify`` checked, through a
cache shared by concurrent processes under a file lock: the key is the file's
sha256 and ``DECODER_VERSION``; an entry is one safetensors file written
atomically and checked on every read. A ``Dataset`` carries its own shapes
(the input shape, the number of classes), so no model reads a constant.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from . import _testing, atomic
from .errors import DataIntegrityError
from .manifest import ManifestEntry, Verified, open_in_root
from .safeio import read_regular

__all__ = ["DECODER_VERSION", "Dataset", "load", "check_cache", "FORMATS_DECODED"]

# Bump whenever decoding changes: it is part of every cache key.
DECODER_VERSION = 1
_MAX_HEADER = 1 << 16  # a cache entry's safetensors header


@dataclass(frozen=True)
class _Layout:
    """What a format's rows hold: ``features`` integer columns in 0..``max_value``
    (an image of ``input_shape``, row-major), then a label in 0..``classes``-1."""

    features: int
    input_shape: tuple[int, ...]
    classes: int
    max_value: int


# The one CSV layout so far (data-manifest.json, "columns"): an 8x8 image, 0..16.
_LAYOUTS = {"csv.gz": _Layout(features=64, input_shape=(1, 8, 8), classes=10, max_value=16)}
FORMATS_DECODED = tuple(_LAYOUTS)  # the manifest formats this module decodes


# eq=False: arrays have no truth value, so field-wise == and hash() would fail.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A decoded dataset: ``x`` (n, features) float32 in [0, 1], ``y`` (n,) int64
    class labels; ``input_shape`` is one example's shape (``x`` rows reshaped),
    ``n_classes`` the number of classes."""

    name: str
    sha256: str
    x: np.ndarray
    y: np.ndarray
    input_shape: tuple[int, ...]
    n_classes: int

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    def decoded_sha256(self) -> str:
        """The canonical hash (pipeline.hashing) of the decoded arrays {x, y}:
        recorded in run.json, so that ``verify`` can compare a fresh decode."""
        from .hashing import weights_sha256
        return weights_sha256({"x": self.x, "y": self.y})


def _bad_row(where: str, fields: list[str], lay: _Layout) -> DataIntegrityError:
    """The error for the first bad field of a row (called only for bad rows)."""
    if len(fields) != lay.features + 1:
        return DataIntegrityError(where, f"{lay.features + 1} comma-separated integers",
                                  f"{len(fields)} fields")
    for col, s in enumerate(fields):
        what, hi = (("label", lay.classes - 1) if col == lay.features
                    else (f"pixel {col}", lay.max_value))
        if not re.fullmatch(r"[+-]?[0-9]+", s):
            return DataIntegrityError(where, f"an integer {what}", repr(s))
        if not 0 <= int(s) <= hi:
            return DataIntegrityError(where, f"{what} in 0..{hi}", s)
    raise AssertionError("_bad_row called on a good row")


def _decode_csv_gz(blob: bytes, path: Path, expected_rows: int,
                   lay: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate gzip'd CSV bytes: (pixels (n, F) uint8, labels (n,) int64)."""
    nf = lay.features
    try:
        text = gzip.decompress(blob).decode("ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataIntegrityError(str(path), "gzip'd ASCII CSV", f"{type(e).__name__}: {e}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last row
    # Fast path: up to 3 digits per field; _bad_row diagnoses the rest.
    good = re.compile(r"[0-9]{1,3}(?:,[0-9]{1,3}){%d}" % nf)
    for i, line in enumerate(lines):
        if not good.fullmatch(line):
            raise _bad_row(f"{path}:{i + 1}", line.split(","), lay)
    if len(lines) != expected_rows or not lines:
        raise DataIntegrityError(str(path), f"{expected_rows} rows (manifest)", f"{len(lines)}")
    rows = np.array([int(v) for v in ",".join(lines).split(",")], dtype=np.int64)
    rows = rows.reshape(len(lines), nf + 1)  # (n, F + 1)
    bad = (rows[:, :nf] > lay.max_value).any(axis=1) | (rows[:, nf] >= lay.classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise _bad_row(f"{path}:{i + 1}", lines[i].split(","), lay)
    return rows[:, :nf].astype(np.uint8), rows[:, nf].copy()


def _decode(root: Path, entry: ManifestEntry, key: str) -> dict[str, np.ndarray]:
    """Decode the entry's file from bytes hashed here, so what is decoded is what was
    verified even if the file is swapped after ``verify`` (the cache key depends on it)."""
    _testing.note_decode(key)
    f, resolved = open_in_root(entry, root)
    with f:
        blob = f.read(entry.size + 1)  # bounded: verify checked the size
    if (found := hashlib.sha256(blob).hexdigest()) != entry.sha256:
        raise DataIntegrityError(str(resolved), f"sha256 {entry.sha256}", f"sha256 {found}",
                                 "the file changed while being loaded; run again")
    lay = _LAYOUTS[entry.format]
    pixels, labels = _decode_csv_gz(blob, resolved, entry.rows, lay)
    # X = f32(pixels) / 16: dividing by a power of two is exact (spec section 2).
    return {"x": pixels.astype(np.float32) / np.float32(lay.max_value), "y": labels}


def _st_data(blob: bytes) -> tuple[dict[str, str], bytes]:
    """(metadata, tensor data section) of a safetensors byte string."""
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    if not 0 <= n <= len(blob) - 8:
        raise ValueError("truncated safetensors header")
    meta = json.loads(blob[8:8 + n]).get("__metadata__") or {}
    return meta, blob[8 + n:]


def _encode_entry(arrays: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """safetensors bytes whose metadata records the sha256 of its tensor data section.

    The data section does not depend on the header, so hash it from a first
    serialisation, then serialise again with the digest in the metadata.
    """
    digest = hashlib.sha256(_st_data(_st_save(arrays, meta))[1]).hexdigest()
    return _st_save(arrays, {**meta, "data_sha256": digest})


def _read_entry(path: Path, meta_want: dict[str, str], rows: int,
                features: int) -> dict[str, np.ndarray] | str:
    """The cached arrays, or why the entry is unusable ("missing" or a corruption)."""
    limit = rows * (features * 4 + 8) + _MAX_HEADER  # x float32, y int64, the header
    try:
        blob = read_regular(path, limit)
    except FileNotFoundError:
        return "missing"
    except OSError as e:  # a FIFO, device or directory planted there; too large
        return f"unreadable ({e.strerror})"
    try:
        meta, data = _st_data(blob)
        found = hashlib.sha256(data).hexdigest()
        if meta.get("data_sha256") != found:
            return f"data sha256 {found}, recorded {meta.get('data_sha256')}"
        if any(meta.get(k) != v for k, v in meta_want.items()):
            return f"metadata {meta}, expected {meta_want}"
        arrays = _st_load(blob)  # never unpickles: safetensors holds raw tensors only
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt entry
        return f"unreadable ({type(e).__name__}: {e})"
    x, y = arrays.get("x"), arrays.get("y")
    if (x is None or y is None or x.dtype != np.float32 or x.shape != (rows, features)
            or y.dtype != np.int64 or y.shape != (rows,)):
        return "wrong tensors, dtypes or shapes"
    return {"x": x, "y": y}


def _cache_path(cache_dir: Path, sha: str) -> tuple[str, Path, dict[str, str]]:
    key = f"{sha}-v{DECODER_VERSION}"
    meta = {"source_sha256": sha, "decoder_version": str(DECODER_VERSION)}
    return key, Path(cache_dir) / f"{key}.safetensors", meta


def load(verified: Verified, name: str, cache_dir: Path, *, trust_cache: bool = True
         ) -> Dataset:
    """Entry ``name`` of ``verified`` decoded, through the cache in ``cache_dir``.

    The cache key is ``<file sha256>-v<DECODER_VERSION>``; the entry is one
    safetensors file written atomically, checked on every read; a corrupt
    entry is reported on stderr and rebuilt. A ``FileLock`` per key makes
    concurrent processes decode once. A cache miss decodes from bytes hashed
    again as they are read (``_decode``). ``trust_cache=False`` (``verify``,
    ``--rebuild``) decodes from the file and reads no cache entry for the
    arrays; an entry that differs is reported and removed (``check_cache``).
    """
    if name not in verified.hashes:
        raise DataIntegrityError(str(verified.path), f"a verified entry {name!r}",
                                 f"entries {sorted(verified.hashes)}")
    entry, sha = verified.entries[name], verified.hashes[name]
    lay = _LAYOUTS[entry.format]
    if not trust_cache:
        got = _fresh(verified, name, cache_dir)
        return Dataset(name=name, sha256=sha, x=got["x"], y=got["y"],
                       input_shape=lay.input_shape, n_classes=lay.classes)
    cache_dir = Path(cache_dir)
    key, path, meta = _cache_path(cache_dir, sha)
    got = _read_entry(path, meta, entry.rows, lay.features)  # lock-free: atomic replaces
    if isinstance(got, str):
        cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(cache_dir / (key + ".lock")):
            got = _read_entry(path, meta, entry.rows, lay.features)  # another process's?
            if isinstance(got, str):
                if got != "missing":
                    print(f"warning: data cache entry {path} is corrupt ({got}); "
                          "discarding and decoding again", file=sys.stderr)
                    path.unlink(missing_ok=True)
                got = _decode(verified.root, entry, key)
                atomic.write_bytes(path, _encode_entry(got, meta))
    return Dataset(name=name, sha256=sha, x=got["x"], y=got["y"], input_shape=lay.input_shape,
                   n_classes=lay.classes)


def _fresh(verified: Verified, name: str, cache_dir: Path) -> dict[str, np.ndarray]:
    """Entry ``name`` decoded from its file; a cache entry that differs is
    reported on stderr and removed."""
    got, problem = _decode_and_compare(verified, name, cache_dir)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    return got


def check_cache(verified: Verified, name: str, cache_dir: Path) -> str | None:
    """Decode ``name`` from its file and compare the cache entry (if any) with
    it: None if they agree (or there is none), else what differs; a differing
    entry is removed. A forged entry is self-consistent (its own data_sha256
    recomputed), so only a fresh decode can catch it (README, "Threat model")."""
    return _decode_and_compare(verified, name, cache_dir)[1]


def _decode_and_compare(verified: Verified, name: str, cache_dir: Path
                        ) -> tuple[dict[str, np.ndarray], str | None]:
    entry, sha = verified.entries[name], verified.hashes[name]
    lay = _LAYOUTS[entry.format]
    key, path, meta = _cache_path(cache_dir, sha)
    got = _decode(verified.root, entry, key)
    cached = _read_entry(path, meta, entry.rows, lay.features)
    if cached == "missing":
        return got, None
    if isinstance(cached, str) or not all(np.array_equal(cached[k], got[k]) for k in got):
        why = cached if isinstance(cached, str) else "arrays differ from a fresh decode"
        path.unlink(missing_ok=True)
        return got, (f"data cache entry {path} does not match {entry.path} decoded again "
                     f"({why}); removed")
    return got, None
