"""Tests for pipeline/scaffold.py (`pipeline new DIR`): the project it writes
trains as written, and the tutorial (docs/tutorial.md) shows exactly those files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import scaffold

from .support import ROOT, pipeline_env, run_pipeline

pytestmark = pytest.mark.process


def test_new_project_trains_and_matches_the_tutorial(tmp_path: Path) -> None:
    """`pipeline new` writes model.py, config.toml, the manifest and the data;
    `pipeline train DIR/config.toml` (from another directory) trains it; the
    tutorial shows the same model.py and config.toml."""
    env = pipeline_env(tmp_path)
    proj = tmp_path / "my project"
    new = run_pipeline(["new", str(proj)], env, timeout=120)
    assert new.returncode == 0, new.stderr
    assert sorted(p.name for p in proj.iterdir()) == ["config.toml", "data",
                                                     "data-manifest.json", "model.py"]
    p = run_pipeline(["train", "config.toml", "train.epochs=1", "--json", "--quiet"], env, proj)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["model"]["factory"] == "model:convnet" and rec["metrics"]["test_accuracy"] > 0.5
    tutorial = (ROOT / "docs" / "tutorial.md").read_text(encoding="utf-8")
    assert scaffold.MODEL_PY in tutorial and scaffold.CONFIG_TOML in tutorial


def test_new_refuses_a_directory_with_files(tmp_path: Path) -> None:
    """An existing, non-empty directory is refused (exit 2) and left as it is."""
    (tmp_path / "keep.txt").write_text("mine")
    p = run_pipeline(["new", str(tmp_path)], pipeline_env(tmp_path), timeout=120)
    assert p.returncode == 2 and "nothing was written" in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cache", "keep.txt"] or \
        sorted(x.name for x in tmp_path.iterdir()) == ["keep.txt"]
