"""Tests for pipeline/manifest.py: the schema, verify, the stat cache."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.errors import DataIntegrityError
from pipeline.data import manifest as data

from ..support.data import SHA, edit_manifest, make_manifest


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_manifest(tmp_path)


_edit_manifest = edit_manifest


def _age(path: Path) -> None:
    """Put the file's mtime an hour in the past (ctime stays now)."""
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = data._sha256_file

    def counting(f: Any, limit: int) -> str:
        calls.append(1)
        return real(f, limit)

    monkeypatch.setattr(data, "_sha256_file", counting)
    return calls


# --- verify -----------------------------------------------------------------

def test_verify_ok(manifest: Path) -> None:
    """An intact copy verifies and reports the manifest's sha256."""
    assert data.verify(manifest).hashes == {"digits": SHA}
    assert data.verify(manifest, names=["digits"], full=True).hashes == {"digits": SHA}


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
    assert data.verify(manifest).hashes == {"digits": SHA}


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
    raw["version"] = 1  # the version before datasets had decode specs
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
        assert data.verify(manifest, stat_cache_dir=cache).hashes == {"digits": SHA}
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
    assert data.verify(manifest, stat_cache_dir=cache).hashes == {"digits": SHA}
    assert json.loads((cache / data.STAT_CACHE_NAME).read_text())["version"] == 1


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


def test_corrupt_stat_cache_record_is_rehashed_not_blamed_on_the_file(
        manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13, case 5: a stat-cache record whose stat matches but whose sha256
    is wrong makes verify hash the file again (no data error for an intact
    file) and rewrite the record; `full` rewrites every record too."""
    monkeypatch.setattr(data, "_RACY_NS", 0)
    cache = tmp_path / "cache"
    _age(manifest.parent / "data" / "digits.csv.gz")
    data.verify(manifest, stat_cache_dir=cache)
    path = cache / data.STAT_CACHE_NAME
    raw = json.loads(path.read_text())
    (rec,) = raw["entries"].values()
    rec["sha256"] = "0" * 64
    path.write_text(json.dumps(raw))
    assert data.verify(manifest, stat_cache_dir=cache).hashes == {"digits": SHA}
    assert [r["sha256"] for r in json.loads(path.read_text())["entries"].values()] == [SHA]
    rec["sha256"] = "1" * 64
    path.write_text(json.dumps(raw))
    data.verify(manifest, stat_cache_dir=cache, full=True)
    assert [r["sha256"] for r in json.loads(path.read_text())["entries"].values()] == [SHA]


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev_zero_link"])
def test_special_data_file_is_refused_without_blocking(manifest: Path, tmp_path: Path,
                                                        kind: str) -> None:
    """Issue 13, case 4: a FIFO, a directory, or a link to /dev/zero where a data
    file (or the manifest) should be is a data error at once: no hang, no traceback."""
    f = manifest.parent / "data" / "digits.csv.gz"
    f.unlink()
    if kind == "fifo":
        os.mkfifo(f)
    elif kind == "directory":
        f.mkdir()
    else:
        os.symlink("/dev/zero", f)
    with pytest.raises(DataIntegrityError):
        data.verify(manifest, stat_cache_dir=tmp_path / "cache")
    if kind != "directory":
        manifest.unlink()
        os.mkfifo(manifest) if kind == "fifo" else os.symlink("/dev/zero", manifest)
        with pytest.raises(DataIntegrityError, match="regular file"):
            data.load_manifest(manifest)


@pytest.mark.parametrize(("edit", "key"), [
    ({"task": "regression"}, "datasets.digits.task"),
    ({"train": {"format": "csv", "file": "nope", "features": [0, 64], "label": 64,
                "classes": 10}}, "datasets.digits.train.file"),
    ({"task": "lm"}, "datasets.digits.task"),
    ({"colour": 1}, "datasets.digits.colour"),
])
def test_dataset_entries_are_checked(manifest: Path, edit: dict[str, Any], key: str) -> None:
    """An unknown task, a spec reading a file the manifest does not list, a task
    that does not fit the format, an unknown key: each named by its dotted key."""
    raw = json.loads(manifest.read_text())
    raw["datasets"]["digits"].update(edit)
    manifest.write_text(json.dumps(raw))
    with pytest.raises(DataIntegrityError) as e:
        data.load_manifest(manifest)
    assert key in str(e.value)
