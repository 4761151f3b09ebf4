"""Tests for pipeline/data/add.py (`pipeline data add`): entries computed
from the file, proven by a decode of every dataset the change touches, never
half-written, never silently replaced; bad options are usage errors (exit 2),
files that do not decode data errors (exit 3), a symbolic link written through."""

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


# --- a change is proven on every dataset it touches ------------------------------------

TEXT = ["--format", "text", "--decode", "vocabulary=chars"]


def _two_datasets(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A manifest with dataset "a" (text of files.words) and "b" (csv of files.rows)."""
    m = root / "data-manifest.json"
    (root / "data" / "words.txt").write_text("hello world\n")
    (root / "data" / "rows.csv").write_text("1,2,0\n3,4,1\n")
    for argv in (["data/words.txt", "--name", "words", *TEXT, "--dataset", "a"],
                 ["data/rows.csv", "--name", "rows", "--format", "csv", "--decode",
                  "features=[0, 2]", "--decode", "label=2", "--decode", "classes=2",
                  "--dataset", "b"]):
        assert cli_main(["data", "add", str(root / argv[0]), *argv[1:], "--manifest", str(m)],
                        monkeypatch, tmp_path) == 0
    return m


def test_force_replacing_a_file_another_dataset_decodes_is_refused(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`data add --force` of another file under the name dataset "a" reads
    (binary, not UTF-8): exit 3 naming datasets.a and files.words, the manifest
    untouched (it was exit 0, `data verify` ok, and training failed); the
    control, another text file, is accepted and "b" is not decoded for it."""
    m = _two_datasets(root, tmp_path, monkeypatch)
    before = m.read_bytes()
    (root / "data" / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    capsys.readouterr()
    argv = ["data", "add", str(root / "data" / "blob.bin"), "--name", "words", "--manifest",
            str(m), "--force"]
    assert cli_main(argv, monkeypatch, tmp_path) == 3
    err = capsys.readouterr().err
    assert f"{m} [datasets.a]: expected a dataset that decodes after this change (it reads " \
           "files.words, which this command changes)" in err
    assert "blob.bin: expected UTF-8 text" in err and "nothing was written" in err
    assert m.read_bytes() == before
    (root / "data" / "blob.bin").write_text("other words\n")
    assert cli_main(argv, monkeypatch, tmp_path) == 0
    assert json.loads(m.read_text())["files"]["words"]["path"] == "data/blob.bin"


def test_only_touched_datasets_are_decoded(root: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A file entry whose content changes decodes the datasets that read it; a
    new file no dataset reads decodes none."""
    from pipeline.data import dataset

    m = _two_datasets(root, tmp_path, monkeypatch)
    seen: list[str] = []
    real = dataset.check_decodes
    monkeypatch.setattr(dataset, "check_decodes", lambda v, n: (seen.append(n), real(v, n)))
    (root / "data" / "more.txt").write_text("more words\n")
    argv = ["data", "add", str(root / "data" / "more.txt"), "--manifest", str(m)]
    assert cli_main([*argv, "--name", "more"], monkeypatch, tmp_path) == 0 and seen == []
    assert cli_main([*argv, "--name", "words", "--force"], monkeypatch, tmp_path) == 0
    assert seen == ["a"]


@pytest.mark.parametrize(("options", "found"), [
    (["--format", "xlsx"], "datasets.bad.train.format: expected one of csv"),
    ([*TEXT, "--decode", "colour=1"], "datasets.bad.train.colour: expected a key of format"),
    (["--format", "text", "--decode", "vocabulary=words"], "datasets.bad.train.vocabulary"),
    (["--format", "text"], ('datasets.bad.train.vocabulary: expected one of "vocabulary" '
                            '("chars" or "bytes") or "tokenizer"')),
    ([*TEXT, "--decode", "max_bytes=0"], "datasets.bad.train.max_bytes"),
    ([*TEXT, "--task", "classification"], "datasets.bad.task: expected lm exactly when"),
    (["--format", "csv", "--decode", "features=[0, 2]"], "datasets.bad.train.label"),
    ([*TEXT, "--decode", "oops"], "--decode 'oops': expected KEY=VALUE"),
    ([*TEXT, "--part", "test"], "datasets.bad.train: expected a decode spec, found nothing"),
])
def test_bad_options_are_usage_errors_naming_no_temporary_file(
        options: list[str], found: str, root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --format, decode key, value or task is exit 2 (it was exit 3 naming a
    deleted `.data-manifest.json.check`), naming the key; nothing is written and
    nothing is left in the manifest's directory."""
    f = root / "data" / "t.txt"
    f.write_text("some text\n")
    m = root / "data-manifest.json"
    rc = cli_main(["data", "add", str(f), "--name", "bad", "--manifest", str(m), *options],
                  monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert found in err and ".check" not in err and "Traceback" not in err
    assert not m.exists() and sorted(p.name for p in root.iterdir()) == ["data"]


def test_a_missing_file_is_a_usage_error(root: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """FILE that does not exist: exit 2 naming it (it was exit 74)."""
    rc = cli_main(["data", "add", str(root / "data" / "nope.txt"), "--name", "n", "--manifest",
                   str(root / "data-manifest.json")], monkeypatch, tmp_path)
    assert rc == 2 and "nope.txt: expected an existing regular file" in capsys.readouterr().err


def test_a_symlinked_manifest_is_written_through(root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--manifest a symbolic link: the link stays a link and its target gets the
    entry (the link was replaced by a plain file); paths stay relative to the
    link's directory, as `data verify` reads them."""
    store = tmp_path / "store"
    store.mkdir()
    link = root / "data-manifest.json"
    link.symlink_to(store / "manifest.json")  # dangling: a new manifest
    (root / "data" / "w.txt").write_text("some words\n")
    argv = ["data", "add", str(root / "data" / "w.txt"), "--manifest", str(link)]
    assert cli_main([*argv, "--name", "w", *TEXT], monkeypatch, tmp_path) == 0
    assert link.is_symlink() and json.loads((store / "manifest.json").read_text())[
        "files"]["w"]["path"] == "data/w.txt"
    assert cli_main([*argv, "--name", "w2"], monkeypatch, tmp_path) == 0
    assert link.is_symlink() and set(json.loads(link.read_text())["files"]) == {"w", "w2"}
    assert cli_main(["data", "verify", "--manifest", str(link)], monkeypatch, tmp_path) == 0
    assert sorted(p.name for p in store.iterdir()) == ["manifest.json"]  # no temp file left
