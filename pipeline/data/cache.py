"""The decode cache: keys and entries. Importing it loads no NumPy (only the
array-entry functions do), so ``data verify``'s fast path (``triage``) stays light.

An entry is named by its key: the sha256 of the canonical JSON of the dataset's
task and decode specs, its files' sha256 and ``DECODER_VERSION``.

- ``<key>.safetensors``: the decoded arrays of a dataset decoded into memory
  (csv, npz, gzip'd IDX, text), written and read by pipeline.data.dataset.
- ``<key>.json``: a dataset with a memory-mapped part (npy, uncompressed IDX;
  pipeline.data.mapped). Its arrays are never copied into the cache (training
  reads them from the verified file); the entry holds only what one whole
  pass over its rows found: its shapes (``info``) and the canonical hash of
  its decoded arrays (``decoded_sha256``, recorded in run.json as
  ``data_decoded``), written once that pass had also checked every value.
  Plain training trusts a well-formed entry and skips the pass; ``verify``,
  ``--rebuild`` and ``data verify --full`` make the pass and compare.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import atomic
from ..core.config import canonical_json
from ..core.safeio import MIB, read_regular
from .manifest import Verified

if TYPE_CHECKING:
    from .task import Task

__all__ = ["DECODER_VERSION", "decoder_of", "MAX_CACHE_ENTRY", "key", "arrays_path", "meta_path",
           "encode_arrays", "read_arrays", "st_data", "read_meta", "write_meta", "triage"]

# Bump whenever decoding changes: it is part of every key. 3: npy and IDX inputs mapped,
# an npy file's size checked exactly, entries of mapped datasets hold metadata only.
# 4: what decodes is narrower (a csv header that parses as data, npy shapes of bools,
# content past max_bytes are refused), so entries decoded before are decoded again.
# 5: images narrower again (animations and PNGs of more than 8 bits per sample refused).
DECODER_VERSION = 5
MAX_CACHE_ENTRY = 16 << 30  # bytes: a decode-cache entry larger than this is refused
_SHA256 = re.compile(r"[0-9a-f]{64}")


def key(verified: Verified, name: str) -> str:
    """The cache key of dataset ``name``."""
    entry = verified.datasets[name]
    spec = {"task": entry.task.name, "train": entry.train, "test": entry.test,
            "files": {f: verified.hashes[f] for f in entry.files()},
            "decoder_version": DECODER_VERSION}
    if (decoder := decoder_of([entry.train, entry.test])) is not None:
        spec["decoder"] = decoder  # another Pillow, codec, tokenizers or pyarrow: another entry
    return hashlib.sha256(canonical_json(spec)).hexdigest()


def decoder_of(specs: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The libraries that decide a dataset's decoded arrays beyond its files and
    this code (keyed, recorded): Pillow and its codecs for images
    (pipeline.data.images), tokenizers for tokenized text (pipeline.data.tokenize),
    pyarrow for parquet and arrow tables (pipeline.data.tables); None for the
    formats this code decodes alone."""
    from .images import decoder_identity, uses_images
    from .tables import decoder_identity as table_decoder
    from .tables import uses_tables
    from .tokenize import identity, uses_tokenizer

    out: dict[str, Any] = {}
    if uses_images(specs):
        out.update(decoder_identity())
    if uses_tokenizer(specs):
        out.update(identity())
    if uses_tables(specs):
        out.update(table_decoder())
    return out or None


def arrays_path(cache_dir: Path, k: str) -> Path:
    return Path(cache_dir) / f"{k}.safetensors"


def meta_path(cache_dir: Path, k: str) -> Path:
    return Path(cache_dir) / f"{k}.json"


def st_data(blob: bytes) -> tuple[dict[str, str], bytes]:
    """(metadata, tensor data section) of a safetensors byte string."""
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    if not 0 <= n <= len(blob) - 8:
        raise ValueError("truncated safetensors header")
    meta = json.loads(blob[8:8 + n]).get("__metadata__") or {}
    return meta, blob[8 + n:]


def encode_arrays(arrays: dict[str, Any], meta: dict[str, str]) -> bytes:
    """safetensors bytes whose metadata records the sha256 of its tensor data section.

    The data section does not depend on the header, so hash it from a first
    serialisation, then serialise again with the digest in the metadata.
    """
    import numpy as np
    from safetensors.numpy import save

    # safetensors.numpy.save writes a non-contiguous array's memory as it lies, not
    # its C-order elements (a transposed stack read back as other values): copy first.
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    digest = hashlib.sha256(st_data(save(arrays, meta))[1]).hexdigest()
    return save(arrays, {**meta, "data_sha256": digest})


def read_arrays(path: Path, key: str, task: Task) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """The cached arrays and metadata, or why the entry is unusable ("missing" or
    a corruption)."""
    import numpy as np
    from safetensors.numpy import load

    try:
        blob = read_regular(path, MAX_CACHE_ENTRY)
    except FileNotFoundError:
        return "missing"
    except OSError as e:  # a FIFO, device or directory planted there; too large
        return f"unreadable ({e.strerror})"
    try:
        meta, data = st_data(blob)
        found = hashlib.sha256(data).hexdigest()
        if meta.get("data_sha256") != found:
            return f"data sha256 {found}, recorded {meta.get('data_sha256')}"
        if meta.get("key") != key:
            return f"key {meta.get('key')}, expected {key}"
        info = json.loads(meta["info"])
        arrays = load(blob)  # never unpickles: safetensors holds raw tensors only
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt entry
        return f"unreadable ({type(e).__name__}: {e})"
    x, y = arrays.get("x"), arrays.get("y")
    if (x is None or x.dtype != np.dtype(task.x_dtype) or task.windows != (y is None)
            or (y is not None and (y.dtype != np.int64 or y.shape != x.shape[:1]))
            or (not task.windows and tuple(x.shape[1:]) != tuple(info["input_shape"]))):
        return "wrong tensors, dtypes or shapes"
    return arrays, info


def _body(k: str, info: dict[str, Any], decoded: str) -> dict[str, Any]:
    return {"version": 1, "key": k, "info": info, "decoded_sha256": decoded}


def write_meta(path: Path, k: str, info: dict[str, Any], decoded: str) -> None:
    """The metadata entry, with the sha256 of its own canonical JSON, written atomically."""
    body = _body(k, info, decoded)
    blob = {**body, "entry_sha256": hashlib.sha256(canonical_json(body)).hexdigest()}
    atomic.write_bytes(path, json.dumps(blob, sort_keys=True).encode())


def _info_ok(info: object) -> bool:
    def ints(v: object) -> bool:
        return isinstance(v, list) and all(type(d) is int and d >= 0 for d in v)
    return (isinstance(info, dict) and set(info) == {"input_shape", "n_classes", "n_train",
                                                     "vocabulary"}
            and ints(info["input_shape"]) and type(info["n_classes"]) is int
            and type(info["n_train"]) is int and info["vocabulary"] is None)


def read_meta(path: Path, k: str) -> tuple[dict[str, Any], str] | str:
    """(info, decoded_sha256) of the metadata entry at ``path``, or why it is
    unusable: "missing", or what is wrong with it."""
    try:
        raw = json.loads(read_regular(path, MIB))
    except FileNotFoundError:
        return "missing"
    except OSError as e:  # a FIFO, device or directory planted there; too large
        return f"unreadable ({e.strerror})"
    except (ValueError, RecursionError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if not isinstance(raw, dict) or set(raw) != {"version", "key", "info", "decoded_sha256",
                                                 "entry_sha256"}:
        return "not a metadata entry"
    body = _body(raw["key"], raw["info"], raw["decoded_sha256"])
    if raw["entry_sha256"] != hashlib.sha256(canonical_json(body)).hexdigest():
        return f"entry sha256 {raw['entry_sha256']!r} does not match its content"
    if raw["version"] != 1 or raw["key"] != k:
        return f"version {raw['version']!r}, key {raw['key']!r}; expected 1, {k}"
    if not _info_ok(raw["info"]) or not (isinstance(raw["decoded_sha256"], str)
                                         and _SHA256.fullmatch(raw["decoded_sha256"])):
        return "wrong fields"
    return raw["info"], raw["decoded_sha256"]


def triage(verified: Verified, cache_dir: Path, *, full: bool
           ) -> tuple[list[str], list[str], list[str]]:
    """``data verify``'s look at the cache, without decoding: (datasets whose
    entry needs a comparison with a fresh decode, problems found, datasets
    not looked at and why). Array entries always need one (their arrays are
    what training reads); a metadata entry only with ``full`` (it holds no
    arrays: training reads the verified file), else it is checked for its own
    consistency, and removed if it fails (the next training rebuilds it). A
    dataset whose decoder is an extra not installed here (tokenizers, pyarrow) has no
    key here: nothing of it can be reused here, so it is named, not checked."""
    from ..core.errors import UsageError

    fresh, problems, skipped = [], [], []
    for name in verified.datasets:
        try:
            k = key(verified, name)
        except UsageError as e:
            skipped.append(f"{name}: its decode cache not checked ({e})")
            continue
        arrays, meta = arrays_path(cache_dir, k), meta_path(cache_dir, k)
        if arrays.exists() or arrays.is_symlink() or (full and (meta.exists()
                                                               or meta.is_symlink())):
            fresh.append(name)
        elif isinstance(why := read_meta(meta, k), str) and why != "missing":
            meta.unlink(missing_ok=True)
            problems.append(f"data cache entry {meta} is corrupt ({why}); removed")
    return fresh, problems, skipped
