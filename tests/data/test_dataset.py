"""Tests for pipeline/dataset.py: decoding and the decode cache."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import _testing
from pipeline.core.errors import DataIntegrityError
from pipeline.data import cache as datacache
from pipeline.data import dataset
from pipeline.data import manifest as manifest_mod
from pipeline.data.task import CLASSIFICATION, LM

from ..support import ROOT as REPO
from ..support.data import SHA, make_manifest, register

FIRST_ROW = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0,
             0, 4, 12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0,
             0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_manifest(tmp_path)


_register = register


def _load(manifest_path: Path, name: str, cache: Path) -> dataset.Dataset:
    """Verify then decode, as a run does (pipeline.recipe.prepare)."""
    return dataset.load(manifest_mod.verify(manifest_path, stat_cache_dir=cache), name, cache)


def _log_decodes(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    monkeypatch.setattr(_testing, "SWITCHES", _testing.Switches(decode_log=str(log)))


# --- decoding and the cache -------------------------------------------------

def test_decode_values_and_shapes(manifest: Path, tmp_path: Path) -> None:
    """1797 rows, x (n, 1, 8, 8) float32 = pixels / 16 in [0, 1], y int64 in 0..9,
    first row known; the dataset carries its shapes."""
    ds = _load(manifest, "digits", tmp_path / "cache")
    assert ds.name == "digits" and ds.sha256 == SHA and ds.task is CLASSIFICATION
    assert ds.input_shape == (1, 8, 8) and ds.n_classes == 10 and ds.n_train == 1797
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == np.int64
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert sorted(set(ds.y.tolist())) == list(range(10))
    np.testing.assert_array_equal(ds.x[0].reshape(64), np.array(FIRST_ROW, dtype=np.float32) / 16)
    assert ds.y[:5].tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(ds.x * 16, np.round(ds.x * 16))  # exact sixteenths


def test_cache_hit_on_second_load(manifest: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The second load reads the cache entry: no decode, identical arrays."""
    log = tmp_path / "decodes.log"
    _log_decodes(monkeypatch, log)
    a = _load(manifest, "digits", tmp_path / "cache")
    b = _load(manifest, "digits", tmp_path / "cache")
    assert log.read_text().count("\n") == 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


@pytest.mark.parametrize("damage", ["flip-data", "flip-header", "truncate", "empty", "foreign"])
def test_corrupt_cache_entry_rebuilt(manifest: Path, tmp_path: Path, damage: str,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged cache entry is reported on stderr, decoded again and replaced."""
    log = tmp_path / "decodes.log"
    _log_decodes(monkeypatch, log)
    good = _load(manifest, "digits", tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    b = bytearray(entry.read_bytes())
    if damage == "flip-data":
        b[-1000] ^= 0x40
    elif damage == "flip-header":
        b[20] ^= 0x01
    elif damage == "foreign":  # self-consistent, but made from other data
        b = bytearray(datacache.encode_arrays({"x": good.x, "y": good.y},
                                         {"key": "0" * 64, "info": "{}"}))
    entry.write_bytes(bytes(b[: len(b) // 2] if damage == "truncate"
                            else b"" if damage == "empty" else b))
    capsys.readouterr()
    again = _load(manifest, "digits", tmp_path / "cache")
    assert "corrupt" in capsys.readouterr().err
    assert log.read_text().count("\n") == 2
    assert np.array_equal(again.x, good.x) and np.array_equal(again.y, good.y)
    _load(manifest, "digits", tmp_path / "cache")
    assert log.read_text().count("\n") == 2  # the rebuilt entry is good


def test_a_run_verifies_before_decoding(manifest: Path, tmp_path: Path) -> None:
    """A corrupt data file stops the verify-then-load path before anything is
    decoded or cached."""
    f = manifest.parent / "data" / "digits.csv.gz"
    b = bytearray(f.read_bytes())
    b[-10] ^= 0x01
    f.write_bytes(bytes(b))
    with pytest.raises(DataIntegrityError):
        _load(manifest, "digits", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.safetensors"))


_WORKER = """
import sys, time, hashlib
from pathlib import Path
from pipeline.data import dataset, manifest
tmp = Path(sys.argv[1])
(tmp / f"ready-{sys.argv[2]}").touch()
while not (tmp / "go").exists():
    time.sleep(0.002)
m, c = tmp / "root" / "data-manifest.json", tmp / "cache"
ds = dataset.load(manifest.verify(m, stat_cache_dir=c), "digits", c)
print(hashlib.sha256(ds.x.tobytes() + ds.y.tobytes()).hexdigest())
"""


@pytest.mark.process
def test_concurrent_processes_decode_once(manifest: Path, tmp_path: Path) -> None:
    """Four processes loading at once share one decode and get identical arrays."""
    log = tmp_path / "decodes.log"
    env = {**os.environ, "PIPELINE_TEST_DECODE_LOG": str(log), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e for _, e in outs]
    assert len({o for o, _ in outs}) == 1
    assert log.read_text().count("\n") == 1


@pytest.mark.parametrize(("line", "found"), [
    ("1," * 63 + "1", "64 fields"),
    ("1," * 30 + "x," + "1," * 33 + "1", "'x'"),
    ("1," * 30 + "17," + "1," * 33 + "1", "in 0..16 \\(value_range\\), found '17'"),
    ("1," * 64 + "10", "label.*in 0..9, found '10'"),
])
def test_bad_csv_row_names_the_line(manifest: Path, tmp_path: Path, line: str,
                                    found: str) -> None:
    """A malformed or out-of-range row is a DataIntegrityError naming file and line."""
    good = ",".join(["0"] * 64 + ["3"])
    _register(manifest, gzip.compress(f"{good}\n{good}\n{line}\n{good}\n".encode(), mtime=0), 4)
    with pytest.raises(DataIntegrityError, match=found) as e:
        _load(manifest, "digits", tmp_path / "cache")
    assert e.value.path == f"{manifest.parent.resolve() / 'data' / 'digits.csv.gz'}:3"


def test_row_count_must_match_manifest(manifest: Path, tmp_path: Path) -> None:
    """A file with more or fewer rows than the manifest's ``rows`` is an error."""
    good = ",".join(["0"] * 64 + ["3"])
    _register(manifest, gzip.compress(f"{good}\n{good}\n".encode(), mtime=0), 3)
    with pytest.raises(DataIntegrityError, match="3 data rows"):
        _load(manifest, "digits", tmp_path / "cache")


def _lm_manifest(tmp_path: Path, train: str, test: str | None = None) -> Path:
    """A manifest with a char-level text dataset (and a test file)."""
    root = tmp_path / "lm"
    (root / "data").mkdir(parents=True)
    files, parts = {}, {}
    for part, text in (("train", train), ("test", test)):
        if text is None:
            continue
        blob = text.encode()
        (root / "data" / f"{part}.txt").write_bytes(blob)
        files[part] = {"path": f"data/{part}.txt", "sha256": hashlib.sha256(blob).hexdigest(),
                       "size": len(blob), "source": "test", "licence": "CC0", "description": ""}
        parts[part] = {"format": "text", "file": part, "vocabulary": "chars"}
    m = root / "data-manifest.json"
    m.write_text(json.dumps({"version": 2, "files": files,
                             "datasets": {"t": {"task": "lm", **parts}}}))
    return m


def test_language_model_windows_and_shapes(tmp_path: Path) -> None:
    """A text dataset: tokens over its vocabulary; windows of ``context``
    tokens, the last one ending before the final token (its target)."""
    ds = _load(_lm_manifest(tmp_path, "abcabcabcab"), "t", tmp_path / "cache")
    assert ds.task is LM and ds.y is None and ds.vocabulary == ("a", "b", "c")
    assert ds.x.tolist() == [0, 1, 2] * 3 + [0, 1] and ds.n_classes == 3
    assert ds.counts(3) == (3, 0) and ds.counts(5) == (2, 0)
    assert ds.shapes(4) == ((4,), 3)
    assert ds.starts(np.array([0, 2]), 3).tolist() == [0, 6]


def test_a_test_file_follows_the_train_tokens(tmp_path: Path) -> None:
    """With a manifest test part, its windows come after the train tokens and
    split() makes them the test split."""
    from pipeline.data.sampling import split

    ds = _load(_lm_manifest(tmp_path, "abcabcabc", "cbacbacba"), "t", tmp_path / "cache")
    assert ds.n_train == 9 and len(ds.x) == 18 and ds.counts(4) == (2, 2)
    train, test = split(ds, 0, 0.5, 4)
    assert train.tolist() == [0, 1] and test.tolist() == [2, 3]
    assert ds.starts(test, 4).tolist() == [9, 13]
