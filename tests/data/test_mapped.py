"""Tests for pipeline/mapped.py and the mapped path through pipeline/dataset.py
and the training loop: npy and IDX inputs stay in their files, a run trained
from the map has the bits of one trained from memory, and a file that changes
after verification is refused.

These train in this process, unpinned, with one torch thread: each test
compares runs made in the same process, so the profile does not matter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import recipe
from pipeline.core import _testing
from pipeline.core.config import load_config
from pipeline.core.errors import DataIntegrityError
from pipeline.core.hashing import weights_sha256
from pipeline.data import cache as datacache
from pipeline.data import dataset, manifest
from pipeline.data.mapped import Rows
from pipeline.recipe import train_in_process

from ..support import ROOT

CONFIG = ROOT / "configs" / "digits.toml"


# One torch thread, no test switch (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """The shipped digits as raw pixels (1797, 1, 8, 8) uint8 0..16 and labels."""
    ds = dataset.load(manifest.verify(ROOT / "data-manifest.json"), "digits",
                      tmp_path_factory.mktemp("cache"))
    assert isinstance(ds.x, np.ndarray) and ds.y is not None
    return (ds.x * 16).astype(np.uint8), ds.y.astype(np.uint8)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _idx(a: np.ndarray, type_byte: int) -> bytes:
    head = struct.pack(f">2xBB{a.ndim}I", type_byte, a.ndim, *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def _encode(fmt: str, a: np.ndarray) -> bytes:
    return _npy(a) if fmt == "npy" else _idx(a, {"u": 0x08, "f": 0x0D}[a.dtype.kind])


def _project(tmp_path: Path, fmt: str, parts: dict[str, tuple[np.ndarray, np.ndarray]],
             divisor: float = 16) -> Path:
    """A manifest under tmp_path/root with dataset "d" whose parts (train, test)
    are npy or IDX pairs of the given arrays."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True, exist_ok=True)
    files, specs = {}, {}
    for part, (x, y) in parts.items():
        for role, a in (("x", x), ("y", y)):
            name = f"{part}-{role}"
            blob = _encode(fmt, a)
            (root / "data" / name).write_bytes(blob)
            files[name] = {"path": f"data/{name}", "sha256": hashlib.sha256(blob).hexdigest(),
                           "size": len(blob), "source": "test", "licence": "CC0",
                           "description": ""}
        specs[part] = {"format": fmt, "x": f"{part}-x", "y": f"{part}-y", "divisor": divisor,
                       "classes": 10}
    m = root / "data-manifest.json"
    m.write_text(json.dumps({"version": 2, "files": files,
                             "datasets": {"d": {"task": "classification", **specs}}}))
    return m


def _load(m: Path, cache: Path, **kw: bool) -> dataset.Dataset:
    return dataset.load(manifest.verify(m, stat_cache_dir=cache), "d", cache, **kw)


def _in_memory(ds: dataset.Dataset) -> dataset.Dataset:
    """The same dataset with its inputs read into memory (the path before mapping)."""
    assert isinstance(ds.x, Rows)
    return dataclasses.replace(ds, x=ds.x.materialise(), decoded=None)


def _fit(ds: dataset.Dataset) -> tuple[str, bytes, list[dict[str, object]]]:
    cfg = load_config(CONFIG, ["train.epochs=2"])
    r = train_in_process(cfg, ds, run_key="k", ckpt_dir=None, quiet=True)
    return weights_sha256(r.params), r.trail, r.metrics


# --- bits unchanged -----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["npy", "idx"])
def test_training_from_the_map_equals_training_from_memory(
        tmp_path: Path, fmt: str, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """The same run trained from the mapped file and from the arrays in memory:
    equal weight hash, trail and metrics; the decoded hash is the same bytes,
    and the in-memory arrays equal an independent f32(x) / f32(16)."""
    x, y = digits
    ds = _load(_project(tmp_path, fmt, {"train": (x, y)}), tmp_path / "cache")
    assert isinstance(ds.x, Rows) and isinstance(ds.x.parts[0].raw, np.memmap)
    mem = _in_memory(ds)
    assert mem.x.tobytes() == (x.astype(np.float32) / np.float32(16)).tobytes()
    assert ds.decoded_sha256() == mem.decoded_sha256() == weights_sha256({"x": mem.x,
                                                                          "y": mem.y})
    assert _fit(ds) == _fit(mem)


def test_a_changed_byte_changes_the_run_or_stops_it(
        tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Controls: one pixel changed (and the manifest updated to match) gives
    other weights; the same change behind the manifest's back stops at
    verification (exit 3)."""
    x, y = digits
    ref = _fit(_load(_project(tmp_path / "a", "npy", {"train": (x, y)}), tmp_path / "c"))
    x2 = x.copy()
    x2[5, 0, 3, 3] ^= 1
    m = _project(tmp_path / "b", "npy", {"train": (x2, y)})
    assert _fit(_load(m, tmp_path / "c"))[0] != ref[0]
    f = m.parent / "data" / "train-x"
    f.write_bytes(_npy(x))  # the manifest still promises x2's hash
    with pytest.raises(DataIntegrityError, match="train-x: expected sha256") as e:
        _load(m, tmp_path / "c")
    assert e.value.exit_code == 3


def test_parts_stack_and_take_across_them(tmp_path: Path,
                                          digits: tuple[np.ndarray, np.ndarray]) -> None:
    """A train and a test part: two maps, rows gathered across both in any order
    equal the in-memory concatenation; the test part is the test split."""
    from pipeline.data.sampling import split

    x, y = digits
    ds = _load(_project(tmp_path, "idx", {"train": (x[:1500], y[:1500]),
                                          "test": (x[1500:], y[1500:])}), tmp_path / "cache")
    assert isinstance(ds.x, Rows) and len(ds.x.parts) == 2 and ds.n_train == 1500
    ids = np.array([1796, 0, 1500, 1499, 7, 1600])
    want = x.astype(np.float32) / np.float32(16)
    assert ds.x.take(ids).tobytes() == want[ids].tobytes()
    assert ds.x.materialise().tobytes() == want.tobytes()
    assert split(ds, 0, 0.2)[1].tolist() == list(range(1500, 1797))


# --- the cache ------------------------------------------------------------------

def test_cache_holds_metadata_only_and_spares_the_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        digits: tuple[np.ndarray, np.ndarray]) -> None:
    """A mapped dataset's entry is a small JSON file (no arrays); the second load
    takes its decoded hash from it without a pass over the rows."""
    log = tmp_path / "decodes.log"
    monkeypatch.setattr(_testing, "SWITCHES", _testing.Switches(decode_log=str(log)))
    m = _project(tmp_path, "npy", {"train": digits})
    a = _load(m, tmp_path / "cache")
    b = _load(m, tmp_path / "cache")
    assert log.read_text().count("\n") == 1
    (entry,) = (p for p in (tmp_path / "cache").glob("*.json")
                if p.name != manifest.STAT_CACHE_NAME)
    assert not list((tmp_path / "cache").glob("*.safetensors"))
    assert entry.name == f"{datacache.key(manifest.verify(m), 'd')}.json"
    assert entry.stat().st_size < 1024
    assert a.decoded == b.decoded == weights_sha256({"x": a.x.materialise(), "y": a.y})


def test_forged_or_corrupt_metadata_entry(tmp_path: Path,
                                          digits: tuple[np.ndarray, np.ndarray]) -> None:
    """A self-consistent forged entry (another decoded hash) is trusted by plain
    loading (documented), caught and removed by a fresh decode (check_cache,
    data verify --full) but not by data verify's fast path; a corrupt entry is
    removed by either and rebuilt by the next load."""
    m, cache = _project(tmp_path, "npy", {"train": digits}), tmp_path / "cache"
    good = _load(m, cache).decoded
    v = manifest.verify(m)
    k = datacache.key(v, "d")
    path = datacache.meta_path(cache, k)
    info = datacache.read_meta(path, k)[0]  # type: ignore[index]
    datacache.write_meta(path, k, info, "0" * 64)
    assert _load(m, cache).decoded == "0" * 64
    recipe.check_caches(v, cache)  # fast path: only the entry's own consistency
    with pytest.raises(DataIntegrityError, match="metadata differs from a fresh decode"):
        recipe.check_caches(v, cache, full=True)
    assert not path.exists() and _load(m, cache).decoded == good
    path.write_bytes(path.read_bytes().replace(b'"n_train": 1797', b'"n_train": 1796'))
    with pytest.raises(DataIntegrityError, match="does not match its content"):
        recipe.check_caches(v, cache)
    assert not path.exists()


def test_values_are_checked_by_the_pass(tmp_path: Path) -> None:
    """A NaN in a mapped float file is found by the pass that fills the cache,
    naming the file and the example."""
    x = np.zeros((3, 2), np.float32)
    x[2, 1] = np.nan
    m = _project(tmp_path, "npy", {"train": (x, np.array([0, 1, 2], np.uint8))}, divisor=1)
    with pytest.raises(DataIntegrityError, match=r"train-x: expected finite float32 .* "
                                                  r"example 2"):
        _load(m, tmp_path / "cache")


# --- time of check, time of use ---------------------------------------------------

def _touch(f: Path) -> None:
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # ctime moves too


def test_a_file_changed_after_verification_is_not_mapped(
        tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Between verify and decode, a changed file (its stat, not its bytes) is
    refused: the descriptor mapped must be the file verify saw."""
    m = _project(tmp_path, "npy", {"train": digits})
    v = manifest.verify(m)
    dataset.load(v, "d", tmp_path / "cache")  # control: unchanged, it loads
    _touch(m.parent / "data" / "train-x")
    with pytest.raises(DataIntegrityError, match="changed since it was verified"):
        dataset.load(v, "d", tmp_path / "cache")


def test_a_file_changed_while_mapped_stops_reading(
        tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """After mapping, every gather checks the descriptor's fstat: a change
    stops the next batch (and so the training step) with exit 3."""
    m = _project(tmp_path, "idx", {"train": digits})
    ds = _load(m, tmp_path / "cache")
    assert isinstance(ds.x, Rows)
    ds.x.take(np.arange(4))
    _touch(m.parent / "data" / "train-x")
    with pytest.raises(DataIntegrityError, match="changed while being read") as e:
        ds.x.take(np.arange(4))
    assert e.value.exit_code == 3


# --- data verify stays light ---------------------------------------------------------

_VERIFY = """
import sys
from pathlib import Path
from pipeline.data import manifest; from pipeline import recipe
m, cache = Path(sys.argv[1]), Path(sys.argv[2])
recipe.check_caches(manifest.verify(m, stat_cache_dir=cache), cache)
print("numpy" in sys.modules)
"""


@pytest.mark.process
def test_data_verify_of_a_mapped_dataset_imports_no_numpy(
        tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """verify + the cache check of a mapped dataset with a cache entry load no
    NumPy; control: with an array entry (the digits csv) they do."""
    m, cache = _project(tmp_path, "npy", {"train": digits}), tmp_path / "cache"
    _load(m, cache)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-c", _VERIFY]
    out = subprocess.run([*run, str(m), str(cache)], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
    dataset.load(manifest.verify(ROOT / "data-manifest.json"), "digits", cache)
    out = subprocess.run([*run, str(ROOT / "data-manifest.json"), str(cache)], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


_RSS = """
import sys
import numpy as np
from pipeline.data import mapped
mapped.RELEASE_BYTES = int(sys.argv[2])
def rss_file():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssFile")).split()[1])
f = open(sys.argv[1], "rb")
rows = mapped.Rows.mapped(mapped.map_npy(f, sys.argv[1]), 1, sys.argv[1], f)
before = peak = rss_file()
for ids in np.random.default_rng(0).permutation(len(rows)).reshape(-1, 64):
    rows.take(ids)
    peak = max(peak, rss_file())
print((peak - before) // 1024)
"""


@pytest.mark.process
def test_scattered_reads_keep_rss_bounded(tmp_path: Path) -> None:
    """Gathering every row of a 64 MiB mapped file in random batches never has
    much more than RELEASE_BYTES of it resident in the process (the pages are
    unmapped, not dropped); control: without releases most of the file becomes
    resident."""
    x = tmp_path / "x.npy"
    np.save(x, np.ones((16384, 1024), np.float32))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def grown_mib(release: int) -> int:
        return int(subprocess.run([sys.executable, "-c", _RSS, str(x), str(release)], env=env,
                                  capture_output=True, text=True, check=True).stdout)

    assert grown_mib(4 << 20) <= 12
    assert grown_mib(1 << 40) >= 48
