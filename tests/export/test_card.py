"""`pipeline card RUN` (pipeline/export/card.py): the card names the run, the
weights hash, each data file with its hash and licence, the metrics, and a
config and command that reproduce the run: the config it prints is read back
by `pipeline train` to the run's own config (the same config_sha256)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from pipeline.core.config import config_from_dict, config_sha256

from ..support import ROOT, cli_main, train_here


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("card-runs")
    return train_here(tmp / "runs", ["train.epochs=2", "model.args.hidden=[32, 16]"], tmp)


def _card(run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
          *extra: str) -> str:
    monkeypatch.chdir(ROOT)
    assert cli_main(["card", str(run), *extra], monkeypatch) == 0
    return capsys.readouterr().out


def test_card_says_what_was_trained_on_what(run: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Run key, weights hash, factory, the data file's sha256 and licence (from
    the project's manifest), every epoch's metrics, the toolchain's lock."""
    text = _card(run, monkeypatch, capsys)
    rec = json.loads((run / "run.json").read_text())
    for want in (rec["run_key"], rec["weights_sha256"], "pipeline.models:mlp",
                 rec["data"]["files"]["digits"], "CC BY 4.0", "data/digits.csv.gz",
                 f"{rec['metrics']['test_accuracy']:.4f}", rec["toolchain"]["lock"],
                 f"pipeline verify runs/{rec['run_key']}"):
        assert want in text, want
    assert len(re.findall(r"^\| (\d+) \|", text, re.MULTILINE)) == 2  # one row per epoch


def test_card_config_reads_back_to_the_runs_config(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The TOML block is the run's config: parsed and validated, its canonical
    hash is run.json's config_sha256."""
    text = _card(run, monkeypatch, capsys)
    block = re.search(r"```toml\n(.*?)```", text, re.DOTALL)
    assert block is not None
    cfg = config_from_dict(tomllib.loads(block.group(1)), "card")
    assert config_sha256(cfg) == json.loads((run / "run.json").read_text())["config_sha256"]


def test_card_without_the_manifest_says_so(run: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A project whose manifest lists other bytes under the file's name: the
    card says so instead of quoting that entry's licence; --out writes the file."""
    manifest = json.loads((ROOT / "data-manifest.json").read_text())
    manifest["files"]["digits"]["sha256"] = "0" * 64
    (tmp_path / "data-manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "card.md"
    _card(run, monkeypatch, capsys, "--project", str(tmp_path), "--out", str(out))
    text = out.read_text()
    assert "lists other bytes" in text and "CC BY 4.0" not in text
