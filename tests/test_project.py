"""Tests for pipeline/project.py: the user's project is the unit every command
works on (issue 23, item 0). Found from the CONFIG's directory or the working
directory upwards, or named with --project; its manifest, default config and
runs/ are the ones used; the shipped project only where none is found, said
on stderr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import project
from pipeline.core.errors import UsageError

from .support import ROOT, cli_main

ROWS = "".join(f"{i % 7}.25,{(i * 3) % 11}.5,{i % 2}\n" for i in range(40))


def _project(tmp: Path, *, config: bool = True, manifest: bool = True) -> Path:
    """A user's project: a small real-valued table, its manifest, its config."""
    root = tmp / "proj"
    (root / "data").mkdir(parents=True)
    (root / "data" / "t.csv").write_text(ROWS)
    if manifest:
        from pipeline.data.add import add

        add(root / "data-manifest.json", root / "data" / "t.csv", name="t", source="made",
            licence="CC0", description="a test table", fmt="csv",
            options={"features": [0, 2], "label": 2, "classes": 2})
    if config:
        (root / "config.toml").write_text(
            '[data]\ndataset = "t"\ntest_fraction = 0.25\n[train]\nepochs = 1\n'
            'batch_size = 8\n')
    return root


# --- finding the project ------------------------------------------------------------

def test_the_nearest_directory_with_a_marker_is_the_project(tmp_path: Path) -> None:
    root = _project(tmp_path)
    deep = root / "a" / "b"
    deep.mkdir(parents=True)
    assert project.find(deep) == root.resolve()
    p = project.resolve(start=deep)
    assert (p.root, p.found, p.config, p.manifest, p.runs) == (
        root.resolve(), True, root.resolve() / "config.toml",
        root.resolve() / "data-manifest.json", root.resolve() / "runs")


def test_a_config_belongs_to_its_own_project_not_the_working_directorys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CONFIG in configs/ of a project (configs/ holds no marker) belongs to
    the project above it, wherever the command runs from."""
    root = _project(tmp_path)
    (root / "configs").mkdir()
    cfg = root / "configs" / "other.toml"
    cfg.write_text("")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert project.resolve(config=cfg).root == root.resolve()


def test_explicit_project_wins_and_must_be_a_project(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert project.resolve(root, config=ROOT / "configs" / "digits.toml").root == root.resolve()
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UsageError, match="expected a directory holding config.toml or "
                                         "data-manifest.json, found neither"):
        project.resolve(plain)
    with pytest.raises(UsageError, match="found nothing"):
        project.resolve(tmp_path / "missing")


def test_no_project_found_is_the_shipped_one_with_runs_here(tmp_path: Path) -> None:
    p = project.resolve(start=tmp_path)
    assert not p.found and p.shipped and p.root == ROOT.resolve()
    assert p.config == ROOT.resolve() / "configs" / "digits.toml"
    assert p.runs == Path("runs")  # the shipped tree may be read-only (a Nix store path)
    assert "none found from" in p.describe() and "runs in ./runs" in p.describe()


def test_a_project_without_a_manifest_reads_the_shipped_one_and_says_so(tmp_path: Path) -> None:
    root = _project(tmp_path, manifest=False)
    p = project.resolve(start=root)
    assert p.found and not p.own_manifest and p.manifest == ROOT / "data-manifest.json"
    assert "the shipped one" in p.describe()


# --- the commands use it --------------------------------------------------------------

def test_commands_in_a_project_use_its_manifest_config_and_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's reproduction, from a subdirectory of a user's project: `data
    add` writes the project's manifest (the checkout's is untouched), `data
    verify` checks the project's files (a corrupted one: exit 3), bare `train`
    trains the project's config.toml into the project's runs/, `runs` lists it."""
    root = _project(tmp_path)
    shipped = (ROOT / "data-manifest.json").read_bytes()
    sub = root / "notebooks"
    sub.mkdir()
    monkeypatch.chdir(sub)
    shutil.copy(root / "data" / "t.csv", root / "data" / "u.csv")
    assert cli_main(["data", "add", "../data/u.csv", "--name", "u"], monkeypatch, tmp_path) == 0
    assert "u" in json.loads((root / "data-manifest.json").read_text())["files"]
    assert (ROOT / "data-manifest.json").read_bytes() == shipped

    capsys.readouterr()
    assert cli_main(["data", "verify"], monkeypatch, tmp_path) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"manifest: {root.resolve() / 'data-manifest.json'}"
    assert "ok t sha256:" in out and "ok digits" not in out

    assert cli_main(["train", "--quiet"], monkeypatch, tmp_path) == 0
    out = capsys.readouterr().out
    key = out.split()[1]
    assert (root / "runs" / key / "run.json").is_file() and not (sub / "runs").exists()
    rec = json.loads((root / "runs" / key / "run.json").read_text())
    assert rec["data"]["dataset"] == "t"
    assert cli_main(["runs"], monkeypatch, tmp_path) == 0
    assert key in capsys.readouterr().out

    (root / "data" / "t.csv").write_text(ROWS.replace("0.25", "0.26", 1))
    assert cli_main(["data", "verify"], monkeypatch, tmp_path) == 3
    assert "t.csv" in capsys.readouterr().err


def test_data_add_outside_any_project_is_refused_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    shipped = (ROOT / "data-manifest.json").read_bytes()
    (tmp_path / "x.csv").write_text(ROWS)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["data", "add", "x.csv", "--name", "x"], monkeypatch, tmp_path) == 2
    assert "no project found" in capsys.readouterr().err
    assert not (tmp_path / "data-manifest.json").exists()
    assert (ROOT / "data-manifest.json").read_bytes() == shipped
    # control: with --project naming a project, the same file is added there
    root = _project(tmp_path)
    shutil.copy(tmp_path / "x.csv", root / "x.csv")
    assert cli_main(["data", "add", str(root / "x.csv"), "--name", "x", "--project",
                     str(root)], monkeypatch, tmp_path) == 0
    assert "x" in json.loads((root / "data-manifest.json").read_text())["files"]


def test_outside_any_project_the_shipped_project_is_used_and_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["data", "verify"], monkeypatch, tmp_path) == 0
    out, err = capsys.readouterr()
    assert "ok digits sha256:" in out
    assert err.startswith(f"project: none found from {tmp_path.resolve()}")


def test_a_project_without_config_needs_a_config_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = _project(tmp_path, config=False)
    monkeypatch.chdir(root)
    assert cli_main(["train", "--quiet"], monkeypatch, tmp_path) == 2
    assert "has no config.toml" in capsys.readouterr().err
    assert not (root / "runs").exists()
