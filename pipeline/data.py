"""Data files: the manifest, verification, the decoded-array cache, split and order.

``data-manifest.json`` names each data file with its sha256, size, source and
licence; paths are relative to the directory holding the manifest (the data
root). ``verify`` checks files against it (a stat cache makes a repeated check
cheap); ``load_dataset`` decodes a verified file through a content-addressed
cache that concurrent processes share under a file lock; ``split`` and
``epoch_order`` are normative in docs/exact-spec.md, section 2.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import stat
import sys
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

import numpy as np
from filelock import FileLock
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from . import atomic, rng
from .errors import DataIntegrityError

__all__ = ["DECODER_VERSION", "DECODE_LOG_ENV", "ManifestEntry", "Dataset", "load_manifest",
           "verify", "load_dataset", "split", "epoch_order", "batches", "default_cache_dir"]

# Bump whenever decoding changes: it is part of every cache key.
DECODER_VERSION = 1
MANIFEST_VERSION = 1
# Test-only switch (docs/architecture-notes.md): when set, every decode appends
# "<pid> <cache key>" to this file (tests count decodes across processes with it).
DECODE_LOG_ENV = "PIPELINE_TEST_DECODE_LOG"
STAT_CACHE_NAME = "verify-stat-cache.json"
_CHUNK = 1 << 20
# A file rewritten within one timestamp tick after it was hashed keeps its
# stat. Like git's "racy clean" rule (git Documentation/technical/racy-git.txt)
# a cache record is trusted only if the file last changed this long before
# hashing began; 2 s covers FAT's mtime resolution, NFS and coarse clocks.
_RACY_NS = 2_000_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS: dict[str, type] = {"path": str, "sha256": str, "size": int, "source": str,
                            "licence": str, "format": str, "columns": str, "rows": int,
                            "description": str}
_FORMATS = ("csv.gz",)
_PIXELS, _LABELS = 64, 10


@dataclass(frozen=True)
class ManifestEntry:
    """One data file as the manifest promises it; ``path`` is relative to the data root."""

    name: str
    path: str
    sha256: str
    size: int
    source: str
    licence: str
    format: str
    columns: str
    rows: int
    description: str


# eq=False: arrays have no truth value, so field-wise == and hash() would fail.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A decoded dataset: ``x`` (n, 64) float32 in [0, 1], ``y`` (n,) int64 in 0..9."""

    name: str
    sha256: str
    x: np.ndarray
    y: np.ndarray


# --- manifest ---------------------------------------------------------------

def _kind(v: object) -> str:
    return type(v).__name__


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
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


def _entry_problems(name: str, raw: object) -> list[tuple[str, str, str]]:
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
    if raw["size"] < 0 or raw["rows"] < 0:
        probs.append((f"{where}.size/rows", "non-negative integers",
                      f"{raw['size']}, {raw['rows']}"))
    if raw["format"] not in _FORMATS:
        probs.append((f"{where}.format", f"one of {_FORMATS}", repr(raw["format"])))
    return probs


def _manifest_problems(raw: object) -> list[tuple[str, str, str]]:
    if not isinstance(raw, dict):
        return [("(top level)", "an object", _kind(raw))]
    probs = [(k, "only the keys version, files", "an unknown key")
             for k in raw if k not in ("version", "files")]
    v = raw.get("version")
    if type(v) is not int or v != MANIFEST_VERSION:
        probs.append(("version", f"{MANIFEST_VERSION}", repr(v) if "version" in raw else "nothing"))
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        probs.append(("files", "a non-empty object", repr(files)[:80]))
        return probs
    for name, entry in files.items():
        probs += _entry_problems(name, entry)
    return probs


def load_manifest(path: Path) -> dict[str, ManifestEntry]:
    """Parse ``path`` strictly: every problem raises DataIntegrityError naming
    the manifest and the key (the first problem; the rest go in the hint)."""
    try:
        raw = json.loads(Path(path).read_bytes(), object_pairs_hook=_reject_duplicates)
    except OSError as e:
        raise DataIntegrityError(str(path), "a readable data manifest",
                                 f"{type(e).__name__}: {e.strerror}") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, duplicates
        raise DataIntegrityError(str(path), "a valid JSON data manifest", f"invalid JSON: {e}",
                                 "restore it from version control") from e
    probs = _manifest_problems(raw)
    if probs:
        key, expected, found = probs[0]
        rest = "; ".join(f"{k}: expected {x}, found {f}" for k, x, f in probs[1:])
        hint = "fix the manifest" + (f"; also {rest}" if rest else "")
        raise DataIntegrityError(f"{path} [{key}]", expected, found, hint)
    return {n: ManifestEntry(name=n, **e) for n, e in raw["files"].items()}


# --- verification -----------------------------------------------------------

def _sha256_file(f: BinaryIO) -> str:
    """sha256 of an open file from its current position, read in 1 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):  # type: ignore[attr-defined]
        h.update(view[:n])
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "dev": st.st_dev, "ctime_ns": st.st_ctime_ns}


def _read_stat_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The stat cache's records; an unreadable or foreign cache counts as empty."""
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != 1:
        return {}
    entries = raw.get("entries")
    return entries if isinstance(entries, dict) else {}


def _cached_sha256(rec: object, st: os.stat_result) -> str | None:
    """The recorded sha256 if ``rec`` matches this stat and is not racy."""
    if not isinstance(rec, dict) or any(rec.get(k) != v for k, v in _stat_key(st).items()):
        return None
    at, digest = rec.get("hashed_at_ns"), rec.get("sha256")
    if type(at) is not int or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        return None
    return digest if max(st.st_mtime_ns, st.st_ctime_ns) + _RACY_NS < at else None


def _update_stat_cache(cache_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / STAT_CACHE_NAME
    with FileLock(cache_dir / (STAT_CACHE_NAME + ".lock")):  # read-modify-write
        entries = _read_stat_cache(path)
        entries.update(records)
        blob = json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True)
        atomic.write_bytes(path, blob.encode())


def _open_in_root(entry: ManifestEntry, root: Path) -> tuple[BinaryIO, Path]:
    """Open the entry's file read-only, refusing anything that resolves outside ``root``."""
    target = root / entry.path
    promise = f"{entry.size} bytes with sha256 {entry.sha256}"
    try:
        resolved = target.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # missing, dangling link, link loop
        raise DataIntegrityError(str(target), promise, f"no readable file ({e})",
                                 "restore the file (see data/README.md)") from e
    if not resolved.is_relative_to(root):
        raise DataIntegrityError(str(target), f"a file inside the data root {root}",
                                 f"a path resolving to {resolved}",
                                 "replace the link by the file itself")
    try:  # O_NOFOLLOW: the resolved path has no links unless one was swapped in since
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise DataIntegrityError(str(target), promise, f"unreadable ({e})") from e
    f = os.fdopen(fd, "rb", buffering=0)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise DataIntegrityError(str(target), "a regular file", "not a regular file")
    return f, resolved


def _verify_one(entry: ManifestEntry, root: Path, cache: dict[str, Any] | None,
                records: dict[str, dict[str, Any]]) -> str:
    f, resolved = _open_in_root(entry, root)
    with f:
        st = os.fstat(f.fileno())
        if st.st_size != entry.size:
            raise DataIntegrityError(str(root / entry.path), f"{entry.size} bytes",
                                     f"{st.st_size} bytes", "the file is truncated or "
                                     "replaced; restore it (see data/README.md)")
        digest = _cached_sha256(cache.get(str(resolved)), st) if cache is not None else None
        if digest is None:
            started = time.time_ns()
            digest = _sha256_file(f)
            if _stat_key(os.fstat(f.fileno())) == _stat_key(st):  # unchanged while hashing
                records[str(resolved)] = {**_stat_key(st), "sha256": digest,
                                          "hashed_at_ns": started}
    if digest != entry.sha256:
        raise DataIntegrityError(str(root / entry.path), f"sha256 {entry.sha256}",
                                 f"sha256 {digest}", "the file is corrupt or was replaced; "
                                 "restore it (see data/README.md)")
    return digest


def _select(manifest: dict[str, ManifestEntry], names: Iterable[str] | None,
            manifest_path: Path) -> list[ManifestEntry]:
    if names is None:
        return list(manifest.values())
    unknown = [n for n in names if n not in manifest]
    if unknown:
        raise DataIntegrityError(str(manifest_path), f"entries among {sorted(manifest)}",
                                 f"no entry {unknown[0]!r}")
    return [manifest[n] for n in names]


def verify(manifest_path: Path, *, names: list[str] | None = None, full: bool = False,
           stat_cache_dir: Path | None = None) -> dict[str, str]:
    """Check every (or each named) file's location, size and sha256; return name -> sha256.

    Raises DataIntegrityError at the first file that is missing, resolves
    outside the data root, or has the wrong size or hash. With
    ``stat_cache_dir`` an unchanged file (same resolved path, size, mtime,
    ctime, inode, device) is not re-hashed unless ``full``; the cache is the
    only thing ever written, and only after every file passed.
    """
    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent.resolve()
    cache = None
    if stat_cache_dir is not None and not full:
        cache = _read_stat_cache(Path(stat_cache_dir) / STAT_CACHE_NAME)
    records: dict[str, dict[str, Any]] = {}
    found = {e.name: _verify_one(e, root, cache, records)
             for e in _select(manifest, names, manifest_path)}
    if stat_cache_dir is not None and records:
        _update_stat_cache(Path(stat_cache_dir), records)
    return found


# --- decoding and the content-addressed cache --------------------------------

def _bad_row(where: str, fields: list[str]) -> DataIntegrityError:
    """The error for the first bad field of a row (called only for bad rows)."""
    if len(fields) != _PIXELS + 1:
        return DataIntegrityError(where, f"{_PIXELS + 1} comma-separated integers",
                                  f"{len(fields)} fields")
    for col, s in enumerate(fields):
        what, hi = ("label", _LABELS - 1) if col == _PIXELS else (f"pixel {col}", 16)
        if not re.fullmatch(r"[+-]?[0-9]+", s):
            return DataIntegrityError(where, f"an integer {what}", repr(s))
        if not 0 <= int(s) <= hi:
            return DataIntegrityError(where, f"{what} in 0..{hi}", s)
    raise AssertionError("_bad_row called on a good row")


def _decode_csv_gz(blob: bytes, path: Path, expected_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate gzip'd CSV bytes: (pixels (n, 64) uint8, labels (n,) int64)."""
    try:
        text = gzip.decompress(blob).decode("ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataIntegrityError(str(path), "gzip'd ASCII CSV", f"{type(e).__name__}: {e}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last row
    # Fast path: up to 3 digits per field; _bad_row diagnoses the rest.
    good = re.compile(r"[0-9]{1,3}(?:,[0-9]{1,3}){%d}" % _PIXELS)
    for i, line in enumerate(lines):
        if not good.fullmatch(line):
            raise _bad_row(f"{path}:{i + 1}", line.split(","))
    if len(lines) != expected_rows or not lines:
        raise DataIntegrityError(str(path), f"{expected_rows} rows (manifest)", f"{len(lines)}")
    rows = np.array([int(v) for v in ",".join(lines).split(",")], dtype=np.int64)
    rows = rows.reshape(len(lines), _PIXELS + 1)  # (n, 65)
    bad = (rows[:, :_PIXELS] > 16).any(axis=1) | (rows[:, _PIXELS] >= _LABELS)
    if bad.any():
        i = int(np.argmax(bad))
        raise _bad_row(f"{path}:{i + 1}", lines[i].split(","))
    return rows[:, :_PIXELS].astype(np.uint8), rows[:, _PIXELS].copy()


def _decode(root: Path, entry: ManifestEntry, key: str) -> dict[str, np.ndarray]:
    """Decode the entry's file from bytes hashed here, so what is decoded is what was
    verified even if the file is swapped after ``verify`` (the cache key depends on it)."""
    if log := os.environ.get(DECODE_LOG_ENV):
        with open(log, "a", encoding="utf-8") as f:  # O_APPEND: one short write per line
            f.write(f"{os.getpid()} {key}\n")
    f, resolved = _open_in_root(entry, root)
    with f:
        blob = f.read()
    if (found := hashlib.sha256(blob).hexdigest()) != entry.sha256:
        raise DataIntegrityError(str(resolved), f"sha256 {entry.sha256}", f"sha256 {found}",
                                 "the file changed while being loaded; run again")
    pixels, labels = _decode_csv_gz(blob, resolved, entry.rows)
    # X = f32(pixels) / 16: dividing by a power of two is exact (spec section 2).
    return {"x": pixels.astype(np.float32) / np.float32(16), "y": labels}


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


def _read_entry(path: Path, meta_want: dict[str, str], rows: int) -> dict[str, np.ndarray] | str:
    """The cached arrays, or why the entry is unusable ("missing" or a corruption)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return "missing"
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
    if (x is None or y is None or x.dtype != np.float32 or x.shape != (rows, _PIXELS)
            or y.dtype != np.int64 or y.shape != (rows,)):
        return "wrong tensors, dtypes or shapes"
    return {"x": x, "y": y}


def load_dataset(manifest_path: Path, name: str, cache_dir: Path) -> Dataset:
    """Verify ``name``'s file, then return it decoded, through the cache in ``cache_dir``.

    The cache key is ``<file sha256>-v<DECODER_VERSION>``; the entry is one
    safetensors file written atomically, checked on every read; a corrupt
    entry is reported on stderr and rebuilt. A ``FileLock`` per key makes
    concurrent processes decode once.
    """
    manifest_path, cache_dir = Path(manifest_path), Path(cache_dir)
    sha = verify(manifest_path, names=[name], stat_cache_dir=cache_dir)[name]
    entry = load_manifest(manifest_path)[name]
    key = f"{sha}-v{DECODER_VERSION}"
    path = cache_dir / f"{key}.safetensors"
    meta = {"source_sha256": sha, "decoder_version": str(DECODER_VERSION)}
    got = _read_entry(path, meta, entry.rows)  # lock-free: entries are replaced atomically
    if isinstance(got, str):
        with FileLock(cache_dir / (key + ".lock")):
            got = _read_entry(path, meta, entry.rows)  # another process may have written it
            if isinstance(got, str):
                if got != "missing":
                    print(f"warning: data cache entry {path} is corrupt ({got}); "
                          "discarding and decoding again", file=sys.stderr)
                    path.unlink(missing_ok=True)
                got = _decode(manifest_path.parent.resolve(), entry, key)
                atomic.write_bytes(path, _encode_entry(got, meta))
    return Dataset(name=name, sha256=sha, x=got["x"], y=got["y"])


# --- split and order (docs/exact-spec.md, section 2) --------------------------

def _check_seed(seed: int) -> None:
    if type(seed) is not int or not 0 <= seed < 1 << 63:
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")


def split(ds: Dataset, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, test_ids), both in ``perm`` order, keyed by seed and the data's sha256."""
    _check_seed(seed)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    n = len(ds.y)
    perm = rng.permutation(rng.key(seed, rng.SPLIT, int(ds.sha256[:16], 16)), n)
    n_test = math.floor(n * float(test_fraction))  # f64 product, as specified
    return perm[n_test:].astype(np.int64), perm[:n_test].astype(np.int64)


def epoch_order(train_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """``train_ids`` permuted for 0-based ``epoch`` by ``key(seed, SHUFFLE, epoch)``."""
    _check_seed(seed)
    return np.asarray(train_ids)[rng.permutation(rng.key(seed, rng.SHUFFLE, epoch),
                                                 len(train_ids))]


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive ``batch_size`` slices of ``order``; a last partial batch is dropped."""
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def default_cache_dir() -> Path:
    """$PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/pipeline, else ~/.cache/pipeline."""
    if env := os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores relative values
        return Path(xdg) / "pipeline"
    return Path.home() / ".cache" / "pipeline"
