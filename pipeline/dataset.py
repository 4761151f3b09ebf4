"""Datasets decoded from verified files, through a content-addressed cache.

``load`` decodes a manifest dataset (pipeline.schema) whose files
``pipeline.manifest.verify`` checked: each part (train, and test if the
manifest gives one) through pipeline.formats. The result goes to a cache
shared by concurrent processes under a file lock: the key covers the files'
sha256, the decode specs and ``DECODER_VERSION``; an entry is one safetensors
file written atomically and checked on every read. A ``Dataset`` carries its
own shapes, so no model reads a constant.

Examples: a classification dataset's rows; a language-modelling dataset's
non-overlapping windows of ``context`` tokens (inputs) and the same windows
shifted by one (targets), taken from the train tokens and, if there is a
test part, from the test tokens after them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from . import _testing, atomic, formats
from .config import canonical_json
from .errors import DataIntegrityError
from .manifest import Verified, file_sha256, open_in_root
from .safeio import read_regular

__all__ = ["DECODER_VERSION", "Dataset", "load", "check_cache", "check_caches",
           "MAX_CACHE_ENTRY"]

# Bump whenever decoding changes: it is part of every cache key.
DECODER_VERSION = 2
MAX_CACHE_ENTRY = 16 << 30  # bytes: a decode-cache entry larger than this is refused


# eq=False: arrays have no truth value, so field-wise == and hash() would fail.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A decoded dataset. Classification: ``x`` (n, *input_shape) float32 and
    ``y`` (n,) int64 in [0, n_classes). Language modelling (``task`` "lm"):
    ``x`` tokens (T,) int64 in [0, n_classes), ``y`` None. The first
    ``n_train`` rows (tokens) are the train part; the rest, if any, the
    manifest's test part. ``sha256``: the train inputs' file (it keys the split)."""

    name: str
    sha256: str
    task: str
    x: np.ndarray
    y: np.ndarray | None
    input_shape: tuple[int, ...]
    n_classes: int
    n_train: int
    vocabulary: tuple[str, ...] | None = None

    def decoded_sha256(self) -> str:
        """The canonical hash (pipeline.hashing) of the decoded arrays {x, y}:
        recorded in run.json, so that ``verify`` can compare a fresh decode."""
        from .hashing import weights_sha256
        return weights_sha256({"x": self.x} if self.y is None else {"x": self.x, "y": self.y})

    @property
    def has_test_part(self) -> bool:
        return self.n_train < len(self.x)

    def counts(self, context: int) -> tuple[int, int]:
        """(train examples, test-part examples) for windows of ``context`` tokens (lm)."""
        if self.task != "lm":
            return self.n_train, len(self.x) - self.n_train
        return (self.n_train - 1) // context, max(len(self.x) - self.n_train - 1, 0) // context

    def shapes(self, context: int) -> tuple[tuple[int, ...], int]:
        """(one example's input shape, classes or vocabulary) as a factory receives them."""
        return ((context,) if self.task == "lm" else self.input_shape), self.n_classes

    def starts(self, ids: np.ndarray, context: int) -> np.ndarray:
        """lm: the first token of each example id (train windows, then test windows)."""
        n_train_windows = self.counts(context)[0]
        ids = np.asarray(ids, dtype=np.int64)
        return np.where(ids < n_train_windows, ids * context,
                        self.n_train + (ids - n_train_windows) * context)


def _key(verified: Verified, name: str) -> str:
    entry = verified.datasets[name]
    spec = {"task": entry.task, "train": entry.train, "test": entry.test,
            "files": {f: verified.hashes[f] for f in entry.files()},
            "decoder_version": DECODER_VERSION}
    return hashlib.sha256(canonical_json(spec)).hexdigest()


def _paths(verified: Verified, names: list[str]) -> dict[str, Path]:
    out = {}
    for n in names:
        f, resolved = open_in_root(verified.entries[n], verified.root)
        f.close()
        out[n] = resolved
    return out


def _still_verified(verified: Verified, paths: dict[str, Path]) -> None:
    """The files decoded are the files verified: hashed again after decoding, so a
    file swapped in between cannot enter the cache under the verified hash."""
    for n, p in paths.items():
        found = file_sha256(p, verified.entries[n].size)
        if found != verified.hashes[n]:
            raise DataIntegrityError(str(p), f"sha256 {verified.hashes[n]}", f"sha256 {found}",
                                     "the file changed while being loaded; run again")


def _decode(verified: Verified, name: str, key: str) -> tuple[dict[str, np.ndarray],
                                                                dict[str, Any]]:
    """Decode every part and join them: (arrays, metadata)."""
    _testing.note_decode(key)
    entry = verified.datasets[name]
    paths = _paths(verified, entry.files())
    parts = [formats.decode(entry.train, paths)]
    if entry.test is not None:
        parts.append(formats.decode(entry.test, paths))
    _still_verified(verified, paths)
    first = parts[0]
    for p in parts[1:]:
        if (p.input_shape, p.n_classes, p.vocabulary) != (first.input_shape, first.n_classes,
                                                          first.vocabulary):
            raise DataIntegrityError(f"{verified.path} [datasets.{name}.test]",
                                     f"the train part's shapes {first.input_shape}, "
                                     f"{first.n_classes} classes, the same vocabulary",
                                     f"{p.input_shape}, {p.n_classes}")
    arrays = {"x": np.concatenate([p.x for p in parts])}
    if first.y is not None:
        arrays["y"] = np.concatenate([p.y for p in parts if p.y is not None])
    meta = {"input_shape": list(first.input_shape), "n_classes": first.n_classes,
            "n_train": len(first.x), "vocabulary": first.vocabulary}
    return arrays, meta


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


def _read_entry(path: Path, key: str, task: str) -> tuple[dict[str, np.ndarray],
                                                          dict[str, Any]] | str:
    """The cached arrays and metadata, or why the entry is unusable ("missing" or
    a corruption)."""
    try:
        blob = read_regular(path, MAX_CACHE_ENTRY)
    except FileNotFoundError:
        return "missing"
    except OSError as e:  # a FIFO, device or directory planted there; too large
        return f"unreadable ({e.strerror})"
    try:
        meta, data = _st_data(blob)
        found = hashlib.sha256(data).hexdigest()
        if meta.get("data_sha256") != found:
            return f"data sha256 {found}, recorded {meta.get('data_sha256')}"
        if meta.get("key") != key:
            return f"key {meta.get('key')}, expected {key}"
        info = json.loads(meta["info"])
        arrays = _st_load(blob)  # never unpickles: safetensors holds raw tensors only
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt entry
        return f"unreadable ({type(e).__name__}: {e})"
    x, y = arrays.get("x"), arrays.get("y")
    want_x = np.int64 if task == "lm" else np.float32
    if (x is None or x.dtype != want_x or (task == "lm") != (y is None)
            or (y is not None and (y.dtype != np.int64 or y.shape != x.shape[:1]))
            or (task != "lm" and tuple(x.shape[1:]) != tuple(info["input_shape"]))):
        return "wrong tensors, dtypes or shapes"
    return arrays, info


def load(verified: Verified, name: str, cache_dir: Path, *, trust_cache: bool = True
         ) -> Dataset:
    """Dataset ``name`` of ``verified``, decoded, through the cache in ``cache_dir``.

    A corrupt cache entry is reported on stderr and rebuilt. A ``FileLock``
    per key makes concurrent processes decode once. ``trust_cache=False``
    (``verify``, ``--rebuild``) decodes from the files and takes no arrays
    from the cache; an entry that differs is reported and removed.
    """
    if name not in verified.datasets:
        raise DataIntegrityError(str(verified.path), f"a dataset among "
                                 f"{sorted(verified.datasets)}", f"no dataset {name!r}")
    if not trust_cache:
        got, problem = _decode_and_compare(verified, name, cache_dir)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
        return _dataset(verified, name, got)
    cache_dir = Path(cache_dir)
    entry = verified.datasets[name]
    key = _key(verified, name)
    path = cache_dir / f"{key}.safetensors"
    got = _read_entry(path, key, entry.task)  # lock-free: entries are replaced atomically
    if isinstance(got, str):
        cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(cache_dir / (key + ".lock")):
            got = _read_entry(path, key, entry.task)  # another process may have written it
            if isinstance(got, str):
                if got != "missing":
                    print(f"warning: data cache entry {path} is corrupt ({got}); "
                          "discarding and decoding again", file=sys.stderr)
                    path.unlink(missing_ok=True)
                arrays, info = _decode(verified, name, key)
                meta = {"key": key, "info": json.dumps(info, sort_keys=True)}
                atomic.write_bytes(path, _encode_entry(arrays, meta))
                got = arrays, info
    return _dataset(verified, name, got)


def _dataset(verified: Verified, name: str,
             got: tuple[dict[str, np.ndarray], dict[str, Any]]) -> Dataset:
    entry = verified.datasets[name]
    arrays, info = got
    vocab = info.get("vocabulary")
    return Dataset(name=name, sha256=verified.hashes[entry.files()[0]], task=entry.task,
                   x=arrays["x"], y=arrays.get("y"), input_shape=tuple(info["input_shape"]),
                   n_classes=int(info["n_classes"]), n_train=int(info["n_train"]),
                   vocabulary=tuple(vocab) if vocab is not None else None)


def check_caches(verified: Verified, cache_dir: Path) -> None:
    """check_cache for every dataset of the manifest; DataIntegrityError
    naming the first entry that differs (all differing entries removed)."""
    problems = [p for name in verified.datasets
                if (p := check_cache(verified, name, cache_dir)) is not None]
    if problems:
        raise DataIntegrityError(problems[0], "a decode-cache entry equal to a fresh decode",
                                 "a differing entry (removed)", "; ".join(problems[1:]))


def check_cache(verified: Verified, name: str, cache_dir: Path) -> str | None:
    """Decode dataset ``name`` from its files and compare the cache entry (if
    any): None if they agree (or there is none), else what differs; a
    differing entry is removed. A forged entry is self-consistent (its own
    data_sha256 recomputed), so only a fresh decode can catch it (README,
    "Hostile inputs")."""
    path = Path(cache_dir) / f"{_key(verified, name)}.safetensors"
    if not (path.exists() or path.is_symlink()):
        return None  # nothing cached: nothing to compare (and no decode needed)
    return _decode_and_compare(verified, name, cache_dir)[1]


def _decode_and_compare(verified: Verified, name: str, cache_dir: Path
                        ) -> tuple[tuple[dict[str, np.ndarray], dict[str, Any]], str | None]:
    entry = verified.datasets[name]
    key = _key(verified, name)
    path = Path(cache_dir) / f"{key}.safetensors"
    got = _decode(verified, name, key)
    cached = _read_entry(path, key, entry.task)
    if cached == "missing":
        return got, None
    same = not isinstance(cached, str) and (
        json.dumps(cached[1], sort_keys=True) == json.dumps(got[1], sort_keys=True)
        and set(cached[0]) == set(got[0])
        and all(np.array_equal(cached[0][k], got[0][k]) for k in got[0]))
    if not same:
        why = cached if isinstance(cached, str) else "arrays differ from a fresh decode"
        path.unlink(missing_ok=True)
        return got, f"data cache entry {path} does not match dataset {name} decoded again " \
                    f"({why}); removed"
    return got, None
