"""`pipeline export RUN --to tensorboard DIR` (pipeline/export/to_tensorboard.py):
TensorBoard's own reader finds every metric of metrics.jsonl at its step;
exporting again replaces the run's directory; without the extra the command
says how to install it (exit 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ..support import ROOT, cli_main, train_here


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits, 3 epochs: three lines in metrics.jsonl."""
    tmp = tmp_path_factory.mktemp("tb-runs")
    return train_here(tmp / "runs", ["train.epochs=3"], tmp)


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard's reader finds in ``logdir``."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_reader_finds_every_metric(run: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Each key of each metrics.jsonl line is a scalar series at that line's
    step, its values the recorded ones (as float32, TensorBoard's type); a
    second export leaves one directory and the same scalars."""
    monkeypatch.chdir(ROOT)
    logdir = tmp_path / "tb"
    for _ in range(2):
        assert cli_main(["export", str(run), "--to", "tensorboard", str(logdir)],
                        monkeypatch) == 0
    assert "train_loss (3)" in capsys.readouterr().out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = {k: [(m["step"], float(np.float32(m[k]))) for m in lines]
            for k in lines[0] if k != "step"}
    assert sorted(p.name for p in logdir.iterdir()) == [run.name]
    assert len(list((logdir / run.name).iterdir())) == 1  # one event file
    assert _scalars(logdir / run.name) == want
    assert sorted(want) == ["epoch", "test_accuracy", "train_loss"]


@pytest.mark.parametrize("target", [["tensorboard", "DIR"], ["mlflow"]])
def test_without_the_extra_the_command_says_how_to_install_it(
        run: Path, target: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """With tensorboard or mlflow not importable: exit 2, one line naming the
    export lock; nothing written."""
    for name in ("tensorboard", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    out = tmp_path / "out"
    argv = ["export", str(run), "--to", *[str(out) if t == "DIR" else t for t in target],
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert cli_main(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "requirements-export.lock" in err and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_export_target_must_be_known(run: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`--to wandb` and `--to tensorboard` without DIR: exit 2, naming the forms."""
    for to in (["wandb"], ["tensorboard"]):
        assert cli_main(["export", str(run), "--to", *to], monkeypatch) == 2
        assert "expected `--to mlflow` or `--to tensorboard DIR`" in capsys.readouterr().err
