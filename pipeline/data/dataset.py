"""Datasets decoded from verified files, through a content-addressed cache.

``load`` decodes a manifest dataset (pipeline.data.schema) whose files
``pipeline.data.manifest.verify`` checked: each part (train, and test if the
manifest gives one) through pipeline.data.formats. The result goes to a cache
(pipeline.data.cache) shared by concurrent processes under a file lock: the
key covers the files' sha256, the decode specs and ``DECODER_VERSION``; an
entry is written atomically and checked on every read. A dataset decoded
into memory caches its arrays (one safetensors file). A dataset with a part
in npy or uncompressed IDX is memory-mapped instead (pipeline.data.mapped): each
such file is opened here, must be the file verify saw (fstat: device, inode,
size, mtime, ctime), and is mapped from that descriptor; its cache entry
holds only metadata and the decoded arrays' hash. A ``Dataset`` carries its
own shapes, so no model reads a constant.

Examples: a classification dataset's rows; a language-modelling dataset's
non-overlapping windows of ``context`` tokens (inputs) and the same windows
shifted by one (targets), taken from the train tokens and, if there is a
test part, from the test tokens after them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from ..core import _testing, atomic
from ..core.errors import DataIntegrityError
from . import cache as datacache
from . import formats
from .cache import DECODER_VERSION, MAX_CACHE_ENTRY, encode_arrays, read_arrays
from .manifest import Verified, file_sha256, open_in_root, stat_key
from .mapped import Rows
from .task import Task

__all__ = ["DECODER_VERSION", "Dataset", "load", "check_cache", "check_decodes",
           "MAX_CACHE_ENTRY"]


# eq=False: arrays have no truth value, so field-wise == and hash() would fail.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A decoded dataset. Classification: ``x`` (n, *input_shape) float32 and
    ``y`` (n,) int64 in [0, n_classes). Language modelling (``task.windows``):
    ``x`` tokens (T,) int64 in [0, n_classes), ``y`` None. The first
    ``n_train`` rows (tokens) are the train part; the rest, if any, the
    manifest's test part. ``sha256``: the train inputs' file (it keys the split).
    A mapped dataset's ``x`` is a ``pipeline.data.mapped.Rows`` (``take`` gathers rows as
    float32; ``materialise`` is the in-memory array) and ``decoded`` its known hash."""

    name: str
    sha256: str
    task: Task
    x: np.ndarray | Rows
    y: np.ndarray | None
    input_shape: tuple[int, ...]
    n_classes: int
    n_train: int
    vocabulary: tuple[str, ...] | None = None
    decoded: str | None = None
    # tokenized text: the tokenizer file (verified) and its sha256, which
    # pipeline predict applies to new text (pipeline.data.tokenize)
    tokenizer: tuple[Path, str] | None = None

    def decoded_sha256(self) -> str:
        """The canonical hash (pipeline.core.hashing) of the decoded arrays {x, y}:
        recorded in run.json, so that ``verify`` can compare a fresh decode. The
        same bytes whether x is mapped (hashed chunk by chunk) or in memory."""
        return self.decoded or _decoded_sha256({"x": self.x, "y": self.y})

    @property
    def has_test_part(self) -> bool:
        return self.n_train < len(self.x)

    def counts(self, context: int) -> tuple[int, int]:
        """(train examples, test-part examples) for windows of ``context`` tokens (lm)."""
        return self.task.counts(len(self.x), self.n_train, context)

    def shapes(self, context: int) -> tuple[tuple[int, ...], int]:
        """(one example's input shape, classes or vocabulary) as a factory receives them."""
        return self.task.input_shape(self.input_shape, context), self.n_classes

    def starts(self, ids: np.ndarray, context: int) -> np.ndarray:
        """lm: the first token of each example id (train windows, then test windows)."""
        n_train_windows = self.counts(context)[0]
        ids = np.asarray(ids, dtype=np.int64)
        return np.where(ids < n_train_windows, ids * context,
                        self.n_train + (ids - n_train_windows) * context)


def _decoded_sha256(arrays: dict[str, Any]) -> str:
    """The canonical hash of {x, y} (y None: {x}); a mapped x is one pass over its
    rows, which also checks every value (``Rows.chunks``)."""
    from ..core.hashing import weights_sha256
    return weights_sha256({k: v for k, v in arrays.items() if v is not None})


def _maps(verified: Verified, name: str) -> bool:
    entry = verified.datasets[name]
    return any(formats.maps(s) for s in (entry.train, entry.test) if s is not None)


def _same_file(verified: Verified, name: str, f: Any) -> None:
    """The open file ``f`` is the one verify checked (its fstat unchanged since)."""
    if (now := stat_key(os.fstat(f.fileno()))) != verified.stats.get(name):
        raise DataIntegrityError(str(verified.root / verified.entries[name].path),
                                 f"the file verified ({verified.stats.get(name)})", f"{now}",
                                 "the file changed since it was verified; run again")


def _still_verified(verified: Verified, paths: dict[str, Path]) -> None:
    """The files decoded are the files verified: hashed again after decoding, so a
    file swapped in between cannot enter the cache under the verified hash."""
    for n, p in paths.items():
        found = file_sha256(p, verified.entries[n].size)
        if found != verified.hashes[n]:
            raise DataIntegrityError(str(p), f"sha256 {verified.hashes[n]}", f"sha256 {found}",
                                     "the file changed while being loaded; run again")


def _decode(verified: Verified, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode every part and join them: (arrays, metadata). A file a part maps is
    mapped from the descriptor opened here, which must still be the file verify
    saw once mapped; the other files are hashed again after decoding."""
    entry = verified.datasets[name]
    specs = [entry.train] + ([entry.test] if entry.test is not None else [])
    mapped = {n for s in specs if formats.maps(s) for n in formats.files_of(s)}
    paths: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        opened = {}
        for n in entry.files():
            f, paths[n] = open_in_root(verified.entries[n], verified.root)
            if n in mapped:
                opened[n] = stack.enter_context(f)
            else:
                f.close()
        parts = [_decode_part(verified, entry.members.get(p, ()), s, paths, opened)
                 for p, s in zip(("train", "test"), specs)]
        for n, f in opened.items():
            _same_file(verified, n, f)
    _still_verified(verified, {n: p for n, p in paths.items() if n not in opened})
    first = parts[0]
    for p in parts[1:]:
        if (p.input_shape, p.n_classes, p.vocabulary) != (first.input_shape, first.n_classes,
                                                          first.vocabulary):
            raise DataIntegrityError(f"{verified.path} [datasets.{name}.test]",
                                     f"the train part's shapes {first.input_shape}, "
                                     f"{first.n_classes} classes, the same vocabulary",
                                     f"{p.input_shape}, {p.n_classes}")
    xs = [p.x for p in parts]
    arrays: dict[str, Any] = {"x": Rows.stack(xs) if any(isinstance(x, Rows) for x in xs)
                              else np.concatenate(xs)}  # type: ignore[arg-type]
    if first.y is not None:
        arrays["y"] = np.concatenate([p.y for p in parts if p.y is not None])
    meta = {"input_shape": list(first.input_shape), "n_classes": first.n_classes,
            "n_train": len(first.x), "vocabulary": first.vocabulary}
    return arrays, meta


def _decode_part(verified: Verified, members: tuple[str, ...], spec: dict[str, Any],
                 paths: dict[str, Path], opened: dict[str, Any]) -> formats.Decoded:
    """One part: an images part through pipeline.data.images (it reads its
    members), every other format through pipeline.data.formats."""
    if spec.get("format") == "images":
        from . import images
        x, y, shape, classes = images.decode(spec, members, verified.entries, paths,
                                             verified.root)
        return formats.Decoded(x=x, y=y, input_shape=shape, n_classes=classes, vocabulary=None)
    return formats.decode(spec, paths, opened)


def load(verified: Verified, name: str, cache_dir: Path, *, trust_cache: bool = True
         ) -> Dataset:
    """Dataset ``name`` of ``verified``, decoded, through the cache in ``cache_dir``.

    A corrupt cache entry is reported on stderr and rebuilt. A ``FileLock``
    per key makes concurrent processes decode once. ``trust_cache=False``
    (``verify``, ``--rebuild``) decodes from the files and takes nothing from
    the cache; an entry that differs is reported and removed.
    """
    if name not in verified.datasets:
        raise DataIntegrityError(str(verified.path), f"a dataset among "
                                 f"{sorted(verified.datasets)}", f"no dataset {name!r}")
    if not trust_cache:
        got, decoded, problem = _decode_and_compare(verified, name, cache_dir)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
        return _dataset(verified, name, got, decoded)
    cache_dir = Path(cache_dir)
    key = datacache.key(verified, name)
    mapped = _maps(verified, name)
    path = (datacache.meta_path if mapped else datacache.arrays_path)(cache_dir, key)
    got = _decode(verified, name) if mapped else None  # mapping reads headers and labels only

    def read() -> Any:  # lock-free: entries are replaced atomically
        if got is None:
            return read_arrays(path, key, verified.datasets[name].task)
        meta = datacache.read_meta(path, key)
        return meta if isinstance(meta, str) or meta[0] == got[1] else "metadata differs"

    cached = read()
    if isinstance(cached, str):
        cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(cache_dir / (key + ".lock")):
            cached = read()  # another process may have written it
            if isinstance(cached, str):
                if cached != "missing":
                    print(f"warning: data cache entry {path} is corrupt ({cached}); "
                          "discarding and decoding again", file=sys.stderr)
                    path.unlink(missing_ok=True)
                _testing.note_decode(key)
                cached = _fill(verified, name, key, path, got)
    if got is not None:
        return _dataset(verified, name, got, cached[1])
    return _dataset(verified, name, cached)


def _fill(verified: Verified, name: str, key: str, path: Path, got: Any) -> Any:
    """Write the entry: decoded arrays, or (mapped: ``got``) the metadata that one
    pass over the rows computes while checking every value."""
    if got is not None:
        decoded = _decoded_sha256(got[0])
        datacache.write_meta(path, key, got[1], decoded)
        return got[1], decoded
    arrays, info = _decode(verified, name)
    meta = {"key": key, "info": json.dumps(info, sort_keys=True)}
    atomic.write_bytes(path, encode_arrays(arrays, meta))
    return arrays, info


def _dataset(verified: Verified, name: str, got: tuple[dict[str, Any], dict[str, Any]],
             decoded: str | None = None) -> Dataset:
    entry = verified.datasets[name]
    arrays, info = got
    vocab = info.get("vocabulary")
    tok = entry.train.get("tokenizer")
    return Dataset(name=name, sha256=verified.hashes[entry.files()[0]], task=entry.task,
                   x=arrays["x"], y=arrays.get("y"), input_shape=tuple(info["input_shape"]),
                   n_classes=int(info["n_classes"]), n_train=int(info["n_train"]),
                   vocabulary=tuple(vocab) if vocab is not None else None, decoded=decoded,
                   tokenizer=(verified.root / verified.entries[tok].path, verified.hashes[tok])
                   if tok is not None else None)


def check_decodes(verified: Verified, name: str) -> None:
    """Decode dataset ``name`` from its files once, taking nothing from the cache
    and writing nothing (``data add``'s proof that an entry works): a mapped
    part's rows are read once, every value checked. DataIntegrityError if not."""
    arrays, _ = _decode(verified, name)
    if isinstance(arrays["x"], Rows):
        for _ in arrays["x"].chunks():
            pass


def check_cache(verified: Verified, name: str, cache_dir: Path) -> str | None:
    """Decode dataset ``name`` from its files and compare the cache entry (if
    any): None if they agree (or there is none), else what differs; a
    differing entry is removed. A forged entry is self-consistent (its own
    digest recomputed), so only a fresh decode can catch it
    (docs/explanation/threat-model.md); for a mapped dataset that is a pass over every row."""
    key = datacache.key(verified, name)
    path = (datacache.meta_path if _maps(verified, name) else datacache.arrays_path)(cache_dir,
                                                                                    key)
    if not (path.exists() or path.is_symlink()):
        return None  # nothing cached: nothing to compare (and no decode needed)
    return _decode_and_compare(verified, name, cache_dir)[2]


def _decode_and_compare(verified: Verified, name: str, cache_dir: Path
                        ) -> tuple[tuple[dict[str, Any], dict[str, Any]], str | None,
                                   str | None]:
    """(a fresh decode, its decoded hash if mapped, the problem with the entry or None)."""
    entry = verified.datasets[name]
    key = datacache.key(verified, name)
    _testing.note_decode(key)
    got = _decode(verified, name)
    if _maps(verified, name):
        path, decoded = datacache.meta_path(cache_dir, key), _decoded_sha256(got[0])
        meta = datacache.read_meta(path, key)
        same = meta == "missing" or meta == (got[1], decoded)
        why = meta if isinstance(meta, str) else "metadata differs from a fresh decode"
    else:
        path, decoded = datacache.arrays_path(cache_dir, key), None
        cached = read_arrays(path, key, entry.task)
        same = cached == "missing" or not isinstance(cached, str) and (
            json.dumps(cached[1], sort_keys=True) == json.dumps(got[1], sort_keys=True)
            and set(cached[0]) == set(got[0])
            and all(np.array_equal(cached[0][k], got[0][k]) for k in got[0]))
        why = cached if isinstance(cached, str) else "arrays differ from a fresh decode"
    if not same:
        path.unlink(missing_ok=True)
        return got, decoded, f"data cache entry {path} does not match dataset {name} decoded " \
                             f"again ({why}); removed"
    return got, decoded, None
