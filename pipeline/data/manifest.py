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
import posixpath
import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..core import atomic
from ..core.errors import DataIntegrityError
from ..core.safeio import MIB, NotRegularFile, open_regular, read_regular
from . import schema
from .schema import DatasetEntry, FileEntry, Manifest

__all__ = ["FileEntry", "DatasetEntry", "Manifest", "Verified", "load_manifest", "verify",
           "verify_parsed", "open_in_root", "hash_files", "file_sha256", "stat_key", "default_cache_dir"]

STAT_CACHE_NAME = "verify-stat-cache.json"
_CHUNK = 1 << 20
# A file rewritten within one timestamp tick after it was hashed keeps its
# stat. Like git's "racy clean" rule (git Documentation/technical/racy-git.txt)
# a cache record is trusted only if the file last changed this long before
# hashing began; 2 s covers FAT's mtime resolution, NFS and coarse clocks.
_RACY_NS = 2_000_000_000
# the manifest and the stat cache: an image folder lists every file (about 300 bytes an
# entry), so 128 MiB holds a few hundred thousand images
MAX_MANIFEST_BYTES = 128 * MIB
_SHA256 = re.compile(r"[0-9a-f]{64}")
HASH_THREADS = min(8, os.cpu_count() or 1)  # files hashed at once (64 files or more)


@dataclass(frozen=True)
class Verified:
    """The manifest as parsed and each checked file's sha256: one per run."""

    path: Path                        # the manifest file
    root: Path                        # the data root (the manifest's directory, resolved)
    entries: dict[str, FileEntry]
    datasets: dict[str, DatasetEntry]
    hashes: dict[str, str]            # file name -> sha256, for each file checked
    # file name -> its stat_key when checked: a later open must find the same
    # (pipeline.data.dataset maps files only if so; pipeline.data.mapped, "Time of check")
    stats: dict[str, dict[str, int]] = field(default_factory=dict)


def load_manifest(path: Path) -> Manifest:
    """Parse ``path`` strictly: every problem raises DataIntegrityError naming
    the manifest and the key (the first problem; the rest go in the hint)."""
    try:
        blob = read_regular(path, MAX_MANIFEST_BYTES)
        raw = json.loads(blob, object_pairs_hook=schema.reject_duplicates)
    except OSError as e:  # missing, a FIFO or device, too large, unreadable
        raise DataIntegrityError(str(path), "a readable data manifest (a regular file of at "
                                 f"most {MAX_MANIFEST_BYTES} bytes)",
                                 f"{type(e).__name__}: {e.strerror}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, dups
        raise DataIntegrityError(str(path), "a valid JSON data manifest",
                                 f"invalid JSON: {e or 'nested too deeply'}",
                                 "restore it from version control") from e
    return schema.parse(raw, str(path))


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


def file_sha256(path: Path, limit: int) -> str:
    """sha256 of the regular file ``path`` (no FIFO, no device), at most
    ``limit + 1`` bytes read: the one file hash of the package."""
    with open_regular(path) as f:
        return _sha256_file(f, limit)


def stat_key(st: os.stat_result) -> dict[str, int]:
    """What identifies a file's content to the stat cache (with the racy-clean rule)."""
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
    if not isinstance(rec, dict) or any(rec.get(k) != v for k, v in stat_key(st).items()):
        return None
    at, digest = rec.get("hashed_at_ns"), rec.get("sha256")
    if type(at) is not int or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        return None
    return digest if max(st.st_mtime_ns, st.st_ctime_ns) + _RACY_NS < at else None


def _update_stat_cache(cache_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    from filelock import FileLock  # here: a warm verify writes nothing and needs no lock

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / STAT_CACHE_NAME
    with FileLock(cache_dir / (STAT_CACHE_NAME + ".lock")):  # read-modify-write
        entries = _read_stat_cache(path)
        entries.update(records)
        blob = json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True)
        atomic.write_bytes(path, blob.encode())


def open_in_root(entry: FileEntry, root: Path) -> tuple[BinaryIO, Path]:
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


def _verify_one(entry: FileEntry, root: Path, cache: dict[str, Any] | None,
                records: dict[str, dict[str, Any]], stats: dict[str, dict[str, int]]) -> str:
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
            if stat_key(os.fstat(f.fileno())) == stat_key(st):  # unchanged while hashing
                records[str(resolved)] = {**stat_key(st), "sha256": digest,
                                          "hashed_at_ns": started}
        stats[entry.name] = stat_key(st)
    if digest != entry.sha256:
        raise DataIntegrityError(str(root / entry.path), f"sha256 {entry.sha256}",
                                 f"sha256 {digest}", "the file is corrupt or was replaced; "
                                 "restore it (see data/README.md)")
    return digest


class _Serial:
    """A pool of no threads (few files): map runs in this thread."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Any, items: Iterable[Any]) -> Iterable[Any]:
        return map(fn, items)


def _pool(n: int) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(HASH_THREADS) if n >= 64 else _Serial()


def hash_files(paths: list[Path], stat_cache_dir: Path | None) -> list[tuple[str, int]]:
    """(sha256, size) of each regular file, on threads; with ``stat_cache_dir`` an
    unchanged file is not hashed again, and what is hashed is recorded there
    (``data add DIR``: the verify that follows then hashes nothing twice)."""
    cache = _read_stat_cache(Path(stat_cache_dir) / STAT_CACHE_NAME) if stat_cache_dir else {}
    records: dict[str, dict[str, Any]] = {}

    def one(path: Path) -> tuple[str, int]:
        with open_regular(path) as f:
            st = os.fstat(f.fileno())
            key = str(path.resolve())
            if (digest := _cached_sha256(cache.get(key), st)) is None:
                started = time.time_ns()
                digest = _sha256_file(f, st.st_size)
                if stat_key(os.fstat(f.fileno())) == stat_key(st):
                    records[key] = {**stat_key(st), "sha256": digest, "hashed_at_ns": started}
        return digest, st.st_size

    with _pool(len(paths)) as pool:
        out = list(pool.map(one, paths))
    if stat_cache_dir is not None and records:
        _update_stat_cache(Path(stat_cache_dir), records)
    return out


def _select(manifest: dict[str, FileEntry], names: Iterable[str] | None,
            manifest_path: Path) -> list[FileEntry]:
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
    return verify_parsed(load_manifest(manifest_path), manifest_path, names=names, full=full,
                         stat_cache_dir=stat_cache_dir)


def verify_parsed(parsed: Manifest, manifest_path: Path, *, names: list[str] | None = None,
                  full: bool = False, stat_cache_dir: Path | None = None) -> Verified:
    """``verify`` of a manifest already parsed, as if it were ``manifest_path``
    (whose directory is the data root): ``data add`` checks the manifest it is
    about to write before writing it."""
    manifest = parsed.files
    root = Path(manifest_path).parent.resolve()
    cache = None  # full: hash every file, and rewrite the stat cache's records
    if stat_cache_dir is not None and not full:
        cache = _read_stat_cache(Path(stat_cache_dir) / STAT_CACHE_NAME)
    records: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, int]] = {}
    selected = _select(manifest, names, Path(manifest_path))
    # Many files (an image folder) hash on threads: hashlib and reads release the
    # GIL. pool.map raises the first failure in manifest order, as the loop would.
    with _pool(len(selected)) as pool:
        digests = list(pool.map(lambda e: _verify_one(e, root, cache, records, stats),
                                selected))
    found = {e.name: d for e, d in zip(selected, digests)}
    check_listed(parsed.datasets, manifest, root, names)
    if stat_cache_dir is not None and records:
        _update_stat_cache(Path(stat_cache_dir), records)
    return Verified(Path(manifest_path), root, manifest, parsed.datasets, found, stats)


def default_cache_dir() -> Path:
    """$PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/pipeline, else ~/.cache/pipeline."""
    if env := os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores relative values
        return Path(xdg) / "pipeline"
    return Path.home() / ".cache" / "pipeline"


def check_listed(datasets: Mapping[str, DatasetEntry], files: Mapping[str, FileEntry],
                 data_root: Path, selected: Collection[str] | None) -> None:
    """Every image file on disk under a folder-layout images part's root is in
    the manifest (whose members are the part's examples): an image copied
    into a class folder after ``data add`` would otherwise be left out of the
    next run, silently. DataIntegrityError naming the first unlisted file and
    how to add it (or a part's index, which decides its examples). Only the
    datasets some of whose files are ``selected`` (None: all) are checked."""
    listed = {posixpath.normpath(e.path) for e in files.values()}
    for name, entry in sorted(datasets.items()):
        if selected is not None and not set(entry.files()) & set(selected):
            continue
        for spec in (entry.train, entry.test):
            if spec is None or spec.get("format") != "images" or "index" in spec:
                continue
            top = data_root / spec["root"]
            unlisted = sorted(p for p in _image_paths(top, data_root) if p not in listed)
            if unlisted:
                more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
                raise DataIntegrityError(str(data_root / unlisted[0]), f"only the images of "
                                         f"dataset {name!r} that the manifest lists under "
                                         f"{spec['root']}/", f"an image file the manifest "
                                         f"does not list{more}",
                                         f"add them: pipeline data add {spec['root']} --name "
                                         f"{name} --force (or move them out of the folder); "
                                         f"a run would leave them out")


def _image_paths(top: Path, data_root: Path) -> list[str]:
    """The image files under ``top``, relative to the data root (POSIX)."""
    from .images import is_image

    out = []
    for dirpath, _, filenames in os.walk(top):
        here = Path(dirpath)
        out += [(here / f).relative_to(data_root).as_posix() for f in filenames
                if is_image(f) and (here / f).is_file()]
    return out
