"""examples/finetune: a pretrained backbone (a safetensors file the project's
manifest lists, loaded with pipeline.pretrained), frozen, and a new head, in
both modes at world sizes 1 and 2: one hash per mode, the backbone exactly
the file's in the trained weights, the file's sha256 in the run key; controls:
unfrozen it moves, and a changed byte in the file stops the run (exit 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ..support import ROOT, pipeline_env, run_pipeline

pytestmark = pytest.mark.process

EXAMPLE = ROOT / "examples" / "finetune"
SHORT = ["train.epochs=1"]


def _train(project: Path, tmp: Path, *args: str) -> Any:
    p = run_pipeline(["train", str(project / "config.toml"), *SHORT, *args, "--runs-dir",
                      str(tmp / "runs"), "--json", "--quiet"], pipeline_env(tmp), cwd=project)
    return p


def _backbone_in(rec: dict[str, Any], runs: Path) -> bool:
    w = load_file(str(runs / rec["run_key"] / "weights.safetensors"))
    bb = load_file(str(EXAMPLE / "data" / "backbone.safetensors"))
    return all(torch.equal(w[f"0.{1 + 2 * i}.{k}"], bb[f"fc{i}.{k}"])
               for i in (0, 1) for k in ("weight", "bias"))


@pytest.mark.parametrize("mode", ["pinned", "exact"])
def test_the_frozen_backbone_is_the_file_at_every_world_size(tmp_path: Path, mode: str) -> None:
    recs = []
    for n in ("1", "2"):
        p = _train(EXAMPLE, tmp_path / n, f"mode={mode}", "--nproc", n)
        assert p.returncode == 0, p.stderr[-2000:]
        recs.append(json.loads(p.stdout))
        assert _backbone_in(recs[-1], tmp_path / n / "runs")
    assert recs[0]["weights_sha256"] == recs[1]["weights_sha256"]
    sha = json.loads((EXAMPLE / "data-manifest.json").read_text())["files"]["backbone"]["sha256"]
    assert recs[0]["data"]["pretrained"] == {"backbone": sha}
    assert recs[0]["parameters"]["frozen"] == ["0.1.bias", "0.1.weight", "0.3.bias",
                                               "0.3.weight"]
    assert recs[0]["metrics"]["test_accuracy"] > 0.8
    moved = _train(EXAMPLE, tmp_path / "moved", f"mode={mode}", "model.args.freeze=false")
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert not _backbone_in(json.loads(moved.stdout), tmp_path / "moved" / "runs")


def test_a_changed_backbone_file_stops_the_run(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    shutil.copytree(EXAMPLE, proj)
    blob = bytearray((proj / "data" / "backbone.safetensors").read_bytes())
    blob[-1] ^= 1
    (proj / "data" / "backbone.safetensors").write_bytes(bytes(blob))
    p = _train(proj, tmp_path)
    assert p.returncode == 3 and "backbone" in p.stderr, p.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("[0-9a-f]*"))
