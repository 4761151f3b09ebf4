"""The data manifest: its schema, verification of every file, the stat cache.

``data-manifest.json`` names each data file with its sha256, size, source and
licence; paths are relative to the directory holding the manifest (the data
root). ``verify`` parses the manifest once and checks every file against it
(a stat cache makes a repeated check cheap); its result, a ``Verified``, is
what the rest of a run uses: nothing parses or hashes the manifest again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

from filelock import FileLock

from . import atomic
from .errors import DataIntegrityError
from .safeio import MIB, NotRegularFile, open_regular, read_regular

__all__ = ["ManifestEntry", "Verified", "load_manifest", "verify", "open_in_root",
           "default_cache_dir", "FORMATS"]

MANIFEST_VERSION = 1
STAT_CACHE_NAME = "verify-stat-cache.json"
_CHUNK = 1 << 20
# A file rewritten within one timestamp tick after it was hashed keeps its
# stat. Like git's "racy clean" rule (git Documentation/technical/racy-git.txt)
# a cache record is trusted only if the file last changed this long before
# hashing began; 2 s covers FAT's mtime resolution, NFS and coarse clocks.
_RACY_NS = 2_000_000_000
MAX_MANIFEST_BYTES = 16 * MIB  # the manifest and the stat cache
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS: dict[str, type] = {"path": str, "sha256": str, "size": int, "source": str,
                            "licence": str, "format": str, "columns": str, "rows": int,
                            "description": str}
FORMATS = ("csv.gz",)  # how an entry decodes (pipeline.dataset)


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

@dataclass(frozen=True)
class Verified:
    """The manifest as parsed and each checked file's sha256: one per run."""

    path: Path                        # the manifest file
    root: Path                        # the data root (the manifest's directory, resolved)
    entries: dict[str, ManifestEntry]
    hashes: dict[str, str]            # name -> sha256, for each file checked


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
    if raw["format"] not in FORMATS:
        probs.append((f"{where}.format", f"one of {FORMATS}", repr(raw["format"])))
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
        blob = read_regular(path, MAX_MANIFEST_BYTES)
        raw = json.loads(blob, object_pairs_hook=_reject_duplicates)
    except OSError as e:  # missing, a FIFO or device, too large, unreadable
        raise DataIntegrityError(str(path), "a readable data manifest (a regular file of at "
                                 f"most {MAX_MANIFEST_BYTES} bytes)",
                                 f"{type(e).__name__}: {e.strerror}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, dups
        raise DataIntegrityError(str(path), "a valid JSON data manifest",
                                 f"invalid JSON: {e or 'nested too deeply'}",
                                 "restore it from version control") from e
    probs = _manifest_problems(raw)
    if probs:
        key, expected, found = probs[0]
        rest = "; ".join(f"{k}: expected {x}, found {f}" for k, x, f in probs[1:])
        hint = "fix the manifest" + (f"; also {rest}" if rest else "")
        raise DataIntegrityError(f"{path} [{key}]", expected, found, hint)
    return {n: ManifestEntry(name=n, **e) for n, e in raw["files"].items()}


# --- verification -----------------------------------------------------------

def _sha256_file(f: BinaryIO, limit: int) -> str:
    """sha256 of an open file from its current position, read in 1 MiB chunks,
    at most ``limit + 1`` bytes (a file growing while hashed then mismatches)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    left = limit + 1
    while left > 0 and (n := f.readinto(view[:min(_CHUNK, left)])):  # type: ignore[attr-defined]
        h.update(view[:n])
        left -= n
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "dev": st.st_dev, "ctime_ns": st.st_ctime_ns}


def _read_stat_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The stat cache's records; an unreadable or foreign cache counts as empty."""
    try:
        raw = json.loads(read_regular(path, MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError):  # missing, special, too large, garbage
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


def open_in_root(entry: ManifestEntry, root: Path) -> tuple[BinaryIO, Path]:
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
        f = open_regular(resolved, follow=False)  # O_NONBLOCK + fstat: no FIFO hangs
    except NotRegularFile as e:
        raise DataIntegrityError(str(target), "a regular file", e.strerror) from None
    except OSError as e:
        raise DataIntegrityError(str(target), promise, f"unreadable ({e})") from e
    return f, resolved


def _verify_one(entry: ManifestEntry, root: Path, cache: dict[str, Any] | None,
                records: dict[str, dict[str, Any]]) -> str:
    f, resolved = open_in_root(entry, root)
    with f:
        st = os.fstat(f.fileno())
        if st.st_size != entry.size:
            raise DataIntegrityError(str(root / entry.path), f"{entry.size} bytes",
                                     f"{st.st_size} bytes", "the file is truncated or "
                                     "replaced; restore it (see data/README.md)")
        digest = _cached_sha256(cache.get(str(resolved)), st) if cache is not None else None
        if digest != entry.sha256:
            # No record, or one that disagrees: only a full hash may blame the file
            # (a corrupt stat-cache record must not stop a run with an intact file).
            started = time.time_ns()
            digest = _sha256_file(f, entry.size)
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
           stat_cache_dir: Path | None = None) -> Verified:
    """Check every (or each named) file's location, size and sha256.

    Raises DataIntegrityError at the first file that is missing, resolves
    outside the data root, or has the wrong size or hash. With
    ``stat_cache_dir`` an unchanged file (same resolved path, size, mtime,
    ctime, inode, device) is not re-hashed unless ``full``; the cache is the
    only thing ever written, and only after every file passed.
    """
    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent.resolve()
    cache = None  # full: hash every file, and rewrite the stat cache's records
    if stat_cache_dir is not None and not full:
        cache = _read_stat_cache(Path(stat_cache_dir) / STAT_CACHE_NAME)
    records: dict[str, dict[str, Any]] = {}
    found = {e.name: _verify_one(e, root, cache, records)
             for e in _select(manifest, names, manifest_path)}
    if stat_cache_dir is not None and records:
        _update_stat_cache(Path(stat_cache_dir), records)
    return Verified(manifest_path, root, manifest, found)


def default_cache_dir() -> Path:
    """$PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/pipeline, else ~/.cache/pipeline."""
    if env := os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores relative values
        return Path(xdg) / "pipeline"
    return Path.home() / ".cache" / "pipeline"