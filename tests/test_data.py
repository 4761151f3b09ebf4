"""Tests for pipeline/data.py: manifest, verify, decode cache, split and order."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import data
from pipeline.errors import DataIntegrityError

REPO = Path(__file__).resolve().parents[1]
SHA = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
FIRST_ROW = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0,
             0, 4, 12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0,
             0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """A private copy of the shipped manifest and data under tmp_path/root."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    shutil.copy(REPO / "data-manifest.json", root / "data-manifest.json")
    shutil.copy(REPO / "data" / "digits.csv.gz", root / "data" / "digits.csv.gz")
    return root / "data-manifest.json"


def _edit_manifest(manifest: Path, **fields: Any) -> None:
    raw = json.loads(manifest.read_text())
    raw["files"]["digits"].update(fields)
    manifest.write_text(json.dumps(raw))


def _register(manifest: Path, payload: bytes, rows: int) -> None:
    """Replace the digits file by ``payload`` and make the manifest promise it."""
    (manifest.parent / "data" / "digits.csv.gz").write_bytes(payload)
    _edit_manifest(manifest, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload),
                   rows=rows)


def _age(path: Path) -> None:
    """Put the file's mtime an hour in the past (ctime stays now)."""
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = data._sha256_file

    def counting(f: Any) -> str:
        calls.append(1)
        return real(f)

    monkeypatch.setattr(data, "_sha256_file", counting)
    return calls


# --- verify -----------------------------------------------------------------

def test_verify_ok(manifest: Path) -> None:
    """An intact copy verifies and reports the manifest's sha256."""
    assert data.verify(manifest) == {"digits": SHA}
    assert data.verify(manifest, names=["digits"], full=True) == {"digits": SHA}


def test_verify_flipped_byte(manifest: Path) -> None:
    """One flipped byte is a DataIntegrityError naming file, expected and found hash."""
    f = manifest.parent / "data" / "digits.csv.gz"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))
    with pytest.raises(DataIntegrityError) as e:
        data.verify(manifest)
    assert str(f) in str(e.value) and SHA in str(e.value)
    assert e.value.found == f"sha256 {hashlib.sha256(bytes(b)).hexdigest()}"
    assert type(e.value).exit_code == 3


def test_verify_truncated(manifest: Path) -> None:
    """A truncated file fails on its size before any hashing."""
    f = manifest.parent / "data" / "digits.csv.gz"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(DataIntegrityError, match="expected 57523 bytes, found 57522 bytes"):
        data.verify(manifest)


def test_verify_missing(manifest: Path) -> None:
    """A missing file is an error naming it."""
    f = manifest.parent / "data" / "digits.csv.gz"
    f.unlink()
    with pytest.raises(DataIntegrityError, match="no readable file") as e:
        data.verify(manifest)
    assert e.value.path == str(f)


def test_verify_unknown_name(manifest: Path) -> None:
    """Asking for a name the manifest lacks is an error, not an empty result."""
    with pytest.raises(DataIntegrityError, match="no entry 'mnist'"):
        data.verify(manifest, names=["mnist"])


def test_verify_symlink_leaving_root(manifest: Path, tmp_path: Path) -> None:
    """A symlink whose target lies outside the data root is refused even if the bytes match."""
    f = manifest.parent / "data" / "digits.csv.gz"
    outside = tmp_path / "outside.csv.gz"
    f.rename(outside)
    f.symlink_to(outside)
    with pytest.raises(DataIntegrityError, match="inside the data root"):
        data.verify(manifest)


def test_verify_symlink_inside_root(manifest: Path) -> None:
    """A symlink that stays inside the data root is followed."""
    f = manifest.parent / "data" / "digits.csv.gz"
    f.rename(manifest.parent / "real.csv.gz")
    f.symlink_to(Path("..") / "real.csv.gz")
    assert data.verify(manifest) == {"digits": SHA}


def test_verify_writes_nothing_but_the_stat_cache(manifest: Path, tmp_path: Path) -> None:
    """verify leaves the data root untouched and writes only its cache, only when asked."""
    def snapshot() -> list[tuple[str, int]]:
        return sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    before = snapshot()
    data.verify(manifest)
    assert snapshot() == before
    data.verify(manifest, stat_cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        data.STAT_CACHE_NAME, data.STAT_CACHE_NAME + ".lock"]
    assert [p for p in snapshot() if "/cache" not in p[0]] == before


# --- the manifest -----------------------------------------------------------

def test_manifest_malformed_json(manifest: Path) -> None:
    """Malformed JSON names the manifest file."""
    manifest.write_text(manifest.read_text()[:-3])
    with pytest.raises(DataIntegrityError, match="invalid JSON") as e:
        data.load_manifest(manifest)
    assert e.value.path == str(manifest)


def test_manifest_duplicate_key(manifest: Path) -> None:
    """A key given twice is an error (JSON would silently keep the last)."""
    manifest.write_text(manifest.read_text().replace('"size": 57523,',
                                                     '"size": 57523, "size": 1,'))
    with pytest.raises(DataIntegrityError, match="duplicate key"):
        data.load_manifest(manifest)


@pytest.mark.parametrize("bad", ["../x.csv.gz", "data/../../x.csv.gz", "/etc/passwd",
                                 "C:\\data\\x.csv.gz", ""])
def test_manifest_path_escaping_root(manifest: Path, bad: str) -> None:
    """Absolute paths and paths leaving the data root are manifest errors naming the key."""
    _edit_manifest(manifest, path=bad)
    with pytest.raises(DataIntegrityError, match=r"\[files\.digits\.path\]") as e:
        data.verify(manifest)
    assert str(manifest) in e.value.path


@pytest.mark.parametrize(("edit", "key"), [
    ({"size": "57523"}, "files.digits.size"),
    ({"size": True}, "files.digits.size"),
    ({"rows": 1797.0}, "files.digits.rows"),
    ({"sha256": SHA.upper()}, "files.digits.sha256"),
    ({"sha256": SHA[:-1]}, "files.digits.sha256"),
    ({"licence": None}, "files.digits.licence"),
    ({"colour": "blue"}, "files.digits.colour"),
    ({"format": "parquet"}, "files.digits.format"),
])
def test_manifest_mistyped_key(manifest: Path, edit: dict[str, Any], key: str) -> None:
    """A mistyped, malformed or unknown entry key names the manifest and that key."""
    _edit_manifest(manifest, **edit)
    with pytest.raises(DataIntegrityError) as e:
        data.load_manifest(manifest)
    assert e.value.path == f"{manifest} [{key}]"


def test_manifest_missing_key_and_version(manifest: Path) -> None:
    """A missing key and a wrong version are both reported, the first as the error."""
    raw = json.loads(manifest.read_text())
    raw["version"] = 2
    del raw["files"]["digits"]["source"]
    manifest.write_text(json.dumps(raw))
    with pytest.raises(DataIntegrityError, match="files.digits.source: expected a str") as e:
        data.load_manifest(manifest)
    assert e.value.path == f"{manifest} [version]"


# --- the stat cache ---------------------------------------------------------

def test_stat_cache_fast_path_and_invalidation(manifest: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged file is hashed once; full=True or a new mtime hashes it again."""
    monkeypatch.setattr(data, "_RACY_NS", 0)  # the racy rule has its own test
    calls = _count_hashes(monkeypatch)
    cache = tmp_path / "cache"
    f = manifest.parent / "data" / "digits.csv.gz"
    _age(f)
    for _ in range(3):
        assert data.verify(manifest, stat_cache_dir=cache) == {"digits": SHA}
    assert len(calls) == 1
    data.verify(manifest, stat_cache_dir=cache, full=True)
    assert len(calls) == 2
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    data.verify(manifest, stat_cache_dir=cache)
    assert len(calls) == 3
    data.verify(manifest, stat_cache_dir=cache)
    assert len(calls) == 3


def test_stat_cache_sees_same_size_same_mtime_edit(manifest: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A same-size edit with the mtime put back is still caught (ctime changed)."""
    monkeypatch.setattr(data, "_RACY_NS", 0)
    f = manifest.parent / "data" / "digits.csv.gz"
    _age(f)
    data.verify(manifest, stat_cache_dir=tmp_path / "cache")
    st = f.stat()
    b = bytearray(f.read_bytes())
    b[100] ^= 0xFF
    time.sleep(0.02)  # let the coarse kernel clock tick so ctime moves
    f.write_bytes(bytes(b))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataIntegrityError, match="sha256"):
        data.verify(manifest, stat_cache_dir=tmp_path / "cache")


def test_stat_cache_racy_entry_rehashed(manifest: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file changed less than _RACY_NS before it was hashed is hashed again next time."""
    calls = _count_hashes(monkeypatch)
    (manifest.parent / "data" / "digits.csv.gz").touch()  # ctime = now
    data.verify(manifest, stat_cache_dir=tmp_path / "cache")
    data.verify(manifest, stat_cache_dir=tmp_path / "cache")
    assert len(calls) == 2


def test_stat_cache_corrupt_is_ignored(manifest: Path, tmp_path: Path) -> None:
    """A garbage stat cache is not trusted and is rewritten."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / data.STAT_CACHE_NAME).write_text("{not json")
    assert data.verify(manifest, stat_cache_dir=cache) == {"digits": SHA}
    assert json.loads((cache / data.STAT_CACHE_NAME).read_text())["version"] == 1


# --- decoding and the cache -------------------------------------------------

def test_decode_values_and_shapes(manifest: Path, tmp_path: Path) -> None:
    """1797 rows, x (n, 64) float32 = pixels / 16 in [0, 1], y int64 in 0..9, first row known."""
    ds = data.load_dataset(manifest, "digits", tmp_path / "cache")
    assert ds.name == "digits" and ds.sha256 == SHA
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == np.int64
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert sorted(set(ds.y.tolist())) == list(range(10))
    np.testing.assert_array_equal(ds.x[0], np.array(FIRST_ROW, dtype=np.float32) / 16)
    assert ds.y[:5].tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(ds.x * 16, np.round(ds.x * 16))  # exact sixteenths


def test_cache_hit_on_second_load(manifest: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The second load reads the cache entry: no decode, identical arrays."""
    log = tmp_path / "decodes.log"
    monkeypatch.setenv(data.DECODE_LOG_ENV, str(log))
    a = data.load_dataset(manifest, "digits", tmp_path / "cache")
    b = data.load_dataset(manifest, "digits", tmp_path / "cache")
    assert log.read_text().count("\n") == 1
    assert (tmp_path / "cache" / f"{SHA}-v{data.DECODER_VERSION}.safetensors").is_file()
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


@pytest.mark.parametrize("damage", ["flip-data", "flip-header", "truncate", "empty", "foreign"])
def test_corrupt_cache_entry_rebuilt(manifest: Path, tmp_path: Path, damage: str,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged cache entry is reported on stderr, decoded again and replaced."""
    log = tmp_path / "decodes.log"
    monkeypatch.setenv(data.DECODE_LOG_ENV, str(log))
    good = data.load_dataset(manifest, "digits", tmp_path / "cache")
    entry = tmp_path / "cache" / f"{SHA}-v{data.DECODER_VERSION}.safetensors"
    b = bytearray(entry.read_bytes())
    if damage == "flip-data":
        b[-1000] ^= 0x40
    elif damage == "flip-header":
        b[20] ^= 0x01
    elif damage == "foreign":  # self-consistent, but made from other data
        b = bytearray(data._encode_entry({"x": good.x, "y": good.y},
                                         {"source_sha256": "0" * 64, "decoder_version": "1"}))
    entry.write_bytes(bytes(b[: len(b) // 2] if damage == "truncate"
                            else b"" if damage == "empty" else b))
    capsys.readouterr()
    again = data.load_dataset(manifest, "digits", tmp_path / "cache")
    assert "corrupt" in capsys.readouterr().err
    assert log.read_text().count("\n") == 2
    assert np.array_equal(again.x, good.x) and np.array_equal(again.y, good.y)
    data.load_dataset(manifest, "digits", tmp_path / "cache")
    assert log.read_text().count("\n") == 2  # the rebuilt entry is good


def test_load_dataset_verifies_first(manifest: Path, tmp_path: Path) -> None:
    """A corrupt data file stops load_dataset before anything is decoded or cached."""
    f = manifest.parent / "data" / "digits.csv.gz"
    b = bytearray(f.read_bytes())
    b[-10] ^= 0x01
    f.write_bytes(bytes(b))
    with pytest.raises(DataIntegrityError):
        data.load_dataset(manifest, "digits", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.safetensors"))


_WORKER = """
import sys, time, hashlib
from pathlib import Path
from pipeline.data import load_dataset
tmp = Path(sys.argv[1])
(tmp / f"ready-{sys.argv[2]}").touch()
while not (tmp / "go").exists():
    time.sleep(0.002)
ds = load_dataset(tmp / "root" / "data-manifest.json", "digits", tmp / "cache")
print(hashlib.sha256(ds.x.tobytes() + ds.y.tobytes()).hexdigest())
"""


def test_concurrent_processes_decode_once(manifest: Path, tmp_path: Path) -> None:
    """Four processes loading at once share one decode and get identical arrays."""
    log = tmp_path / "decodes.log"
    env = {**os.environ, data.DECODE_LOG_ENV: str(log), "PYTHONPATH": str(REPO)}
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
    ("1," * 64 + "1,1", "66 fields"),
    ("1," * 30 + "x," + "1," * 33 + "1", "'x'"),
    ("1," * 30 + "2.5," + "1," * 33 + "1", "'2.5'"),
    ("1," * 30 + " 2," + "1," * 33 + "1", "' 2'"),
    ("1," * 30 + "17," + "1," * 33 + "1", "expected pixel 30 in 0..16, found 17"),
    ("1," * 30 + "-1," + "1," * 33 + "1", "expected pixel 30 in 0..16, found -1"),
    ("1," * 30 + "1000," + "1," * 33 + "1", "found 1000"),
    ("1," * 64 + "10", "expected label in 0..9, found 10"),
    ("", "1 fields"),
])
def test_bad_csv_row_names_the_line(manifest: Path, tmp_path: Path, line: str,
                                    found: str) -> None:
    """A malformed or out-of-range row is a DataIntegrityError naming file and line."""
    good = ",".join(["0"] * 64 + ["3"])
    _register(manifest, gzip.compress(f"{good}\n{good}\n{line}\n{good}\n".encode(), mtime=0), 4)
    with pytest.raises(DataIntegrityError, match=found) as e:
        data.load_dataset(manifest, "digits", tmp_path / "cache")
    assert e.value.path == f"{manifest.parent.resolve() / 'data' / 'digits.csv.gz'}:3"


def test_row_count_must_match_manifest(manifest: Path, tmp_path: Path) -> None:
    """A file with more or fewer rows than the manifest's ``rows`` is an error."""
    good = ",".join(["0"] * 64 + ["3"])
    _register(manifest, gzip.compress(f"{good}\n{good}\n".encode(), mtime=0), 3)
    with pytest.raises(DataIntegrityError, match="3 rows"):
        data.load_dataset(manifest, "digits", tmp_path / "cache")


# --- split and order --------------------------------------------------------

def _ref_out(k: int, n: int) -> list[int]:
    """SplitMix64 out(K, i), i < n, in plain Python integers (docs/exact-spec.md, 1)."""
    m = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    return [mix((k + (i + 1) * 0x9E3779B97F4A7C15) & m) for i in range(n)]


def _ds(sha: str = SHA, n: int = 1797) -> data.Dataset:
    return data.Dataset("t", sha, np.zeros((n, 64), np.float32), np.zeros(n, np.int64))


def test_split_matches_spec_reference() -> None:
    """split is section 2 of the spec, recomputed here with Python integers."""
    from pipeline import rng

    seed, n = 7, 1797
    out = _ref_out(rng.key(seed, rng.SPLIT, int(SHA[:16], 16)), n)
    perm = sorted(range(n), key=lambda i: out[i])  # sorted() is stable
    n_test = int(n * 0.2)
    train, test = data.split(_ds(), seed, 0.2)
    assert test.tolist() == perm[:n_test] and train.tolist() == perm[n_test:]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.5, 0.999])
def test_split_is_a_deterministic_partition(fraction: float) -> None:
    """Train and test partition range(n) with n_test = floor(n * f), the same every call."""
    train, test = data.split(_ds(), 3, fraction)
    assert len(test) == int(1797 * fraction) and len(train) == 1797 - len(test)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    again = data.split(_ds(), 3, fraction)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_split_depends_on_seed_and_data_hash() -> None:
    """Another seed or another data sha256 gives another split."""
    base = data.split(_ds(), 0, 0.2)[1]
    assert not np.array_equal(base, data.split(_ds(), 1, 0.2)[1])
    assert not np.array_equal(base, data.split(_ds("f" * 64), 0, 0.2)[1])


def test_split_rejects_bad_arguments() -> None:
    """Seeds outside [0, 2^63) and fractions outside [0, 1) are errors."""
    for seed, fraction in [(-1, 0.2), (1 << 63, 0.2), (0, 1.0), (0, -0.1)]:
        with pytest.raises(ValueError):
            data.split(_ds(), seed, fraction)


def test_epoch_order_is_a_permutation_differing_by_epoch() -> None:
    """Each epoch orders exactly the train ids, reproducibly, differently per epoch."""
    from pipeline import rng

    train, _ = data.split(_ds(), 0, 0.2)
    orders = [data.epoch_order(train, 0, e) for e in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == sorted(train.tolist())
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    assert np.array_equal(orders[2], data.epoch_order(train, 0, 2))
    out = _ref_out(rng.key(0, rng.SHUFFLE, 1), len(train))
    assert orders[1].tolist() == [int(train[i]) for i in sorted(range(len(train)),
                                                                key=lambda i: out[i])]


def test_batches_drop_the_last_partial_batch() -> None:
    """floor(n / b) consecutive batches of exactly b ids."""
    order = np.arange(10)
    got = data.batches(order, 3)
    assert [b.tolist() for b in got] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert data.batches(order, 11) == []
    assert len(data.batches(np.arange(1437), 64)) == 22
    with pytest.raises(ValueError):
        data.batches(order, 0)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$PIPELINE_CACHE_DIR wins, then $XDG_CACHE_HOME/pipeline, then ~/.cache/pipeline."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PIPELINE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "pipeline"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "pipeline"
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "own"))
    assert data.default_cache_dir() == tmp_path / "own"
