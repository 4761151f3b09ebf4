"""Tests for pipeline/manifest_edit.py (`pipeline data add`): entries computed
from the file, proven by a decode, never half-written, never silently
replaced."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest


from ..support import ROOT as REPO
from ..support import cli_main
from ..support.data import SHA


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "proj"
    (d / "data").mkdir(parents=True)
    (d / "data" / "digits.csv.gz").write_bytes((REPO / "data" / "digits.csv.gz").read_bytes())
    return d


CSV = ["--format", "csv", "--decode", "compression=gzip", "--decode", "features=[0, 64]",
       "--decode", "label=64", "--decode", "shape=[1, 8, 8]", "--decode", "divisor=16",
       "--decode", "classes=10"]


def test_add_writes_the_file_and_dataset_entries(root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A new manifest gets the file's sha256, size and relative path, and a
    dataset part that decodes; a second identical add changes nothing."""
    m = root / "data-manifest.json"
    argv = ["data", "add", str(root / "data" / "digits.csv.gz"), "--name", "digits",
            "--manifest", str(m), "--licence", "CC BY 4.0", *CSV]
    assert cli_main(argv, monkeypatch, tmp_path) == 0
    raw = json.loads(m.read_text())
    assert raw["files"]["digits"]["sha256"] == SHA and raw["files"]["digits"]["size"] == 57523
    assert raw["files"]["digits"]["path"] == "data/digits.csv.gz"
    assert raw["datasets"]["digits"]["task"] == "classification"
    assert raw["datasets"]["digits"]["train"]["classes"] == 10
    before = m.read_bytes()
    assert cli_main(argv, monkeypatch, tmp_path) == 0 and m.read_bytes() == before


def test_a_differing_entry_needs_force(root: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Another file under an existing name is refused (exit 2, manifest
    untouched) unless --force."""
    m = root / "data-manifest.json"
    base = ["data", "add", "--name", "digits", "--manifest", str(m)]
    assert cli_main([*base[:2], str(root / "data" / "digits.csv.gz"), *base[2:], *CSV],
                    monkeypatch, tmp_path) == 0
    other = root / "data" / "other.csv.gz"
    good = ",".join(["0"] * 64 + ["3"])
    other.write_bytes(gzip.compress(f"{good}\n{good}\n".encode(), mtime=0))
    before = m.read_bytes()
    assert cli_main([*base[:2], str(other), *base[2:], *CSV], monkeypatch, tmp_path) == 2
    assert "--force" in capsys.readouterr().err and m.read_bytes() == before
    assert cli_main([*base[:2], str(other), *base[2:], *CSV, "--force"], monkeypatch, tmp_path) == 0
    assert json.loads(m.read_text())["files"]["digits"]["sha256"] == \
        hashlib.sha256(other.read_bytes()).hexdigest()


@pytest.mark.parametrize(("payload", "options", "code", "found"), [
    (b"\xff\xfe not utf-8", ["--format", "text", "--decode", "vocabulary=chars"], 3,
     "byte offset"),
    (b"0,0,1\n", ["--format", "csv", "--decode", "features=[0, 2]", "--decode", "label=2",
                  "--decode", "classes=1"], 3, "(label): in 0..0"),
    (b"0,0,1\n", ["--format", "csv", "--decode", "features=[0, 2]"], 3, "label"),
])
def test_entries_that_do_not_decode_write_nothing(
        payload: bytes, options: list[str], code: int, found: str, root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A text file that is not UTF-8, labels out of range, a missing decode key:
    a clear error naming the problem, and no manifest written."""
    f = root / "data" / "bad.bin"
    f.write_bytes(payload)
    m = root / "data-manifest.json"
    rc = cli_main(["data", "add", str(f), "--name", "bad", "--manifest", str(m), *options],
                  monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert rc == code, err
    assert found in err and not m.exists()


def test_file_outside_the_data_root_is_refused(root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest stores paths inside its own directory only."""
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.zeros((2, 2), np.float32))
    rc = cli_main(["data", "add", str(outside), "--name", "x", "--manifest",
                   str(root / "data-manifest.json")], monkeypatch, tmp_path)
    assert rc == 2 and not (root / "data-manifest.json").exists()
