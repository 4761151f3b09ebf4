"""pipeline/record/metrics.py: metrics.jsonl read back within a bound, every
value a finite number, steps increasing, the last line run.json's metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.core.errors import CheckpointError
from pipeline.record.metrics import read_metrics
from pipeline.record.schema import load_record

from ..support import train_here


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("metrics-runs")
    return train_here(tmp / "runs", ["train.epochs=2"], tmp)


def test_reads_every_epoch(run: Path) -> None:
    """Two epochs: two lines, their steps and values as written."""
    record = load_record(run / "run.json")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    got = read_metrics(run, record)
    assert [e.step for e in got] == [x["step"] for x in lines] and len(got) == 2
    assert got[-1].values["test_accuracy"] == record.metrics["test_accuracy"]


def _edit_last(text: str) -> str:
    """The last line's test accuracy set to 0.5."""
    lines = text.splitlines()
    lines[-1] = json.dumps({**json.loads(lines[-1]), "test_accuracy": 0.5})
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("edit,message", [
    (_edit_last, "run.json's metrics"),
    (lambda t: t.splitlines()[0] + "\n", "a last line at step"),
    (lambda t: t + "{not json\n", "a JSON object"),
    (lambda t: t.replace('"train_loss": ', '"train_loss": "x", "t": ', 1), "a finite number"),
    (lambda t: t + t.splitlines()[0] + "\n", "a step after"),
], ids=["edited-last-metric", "truncated", "malformed", "not-a-number", "steps-not-increasing"])
def test_edited_metrics_are_refused(run: Path, tmp_path: Path, edit, message: str) -> None:
    """An edited last value, a truncated file, a malformed line, a value that
    is not a number, steps that do not increase: CheckpointError naming the file,
    by run.json's sha256 of it; and, for a record from before that hash, by the
    file's own checks."""
    import dataclasses

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / "metrics.jsonl"
    path.write_text(edit(path.read_text()))
    record = load_record(copy / "run.json")
    with pytest.raises(CheckpointError, match="run.json's files") as e:
        read_metrics(copy, record)
    assert "metrics.jsonl" in str(e.value)
    older = dataclasses.replace(record, files={"weights.safetensors":
                                               record.files["weights.safetensors"]})
    with pytest.raises(CheckpointError, match=message) as e:
        read_metrics(copy, older)
    assert "metrics.jsonl" in str(e.value)


def test_an_edit_of_an_earlier_line_is_caught_by_the_hash(run: Path, tmp_path: Path) -> None:
    """The first epoch's accuracy changed: the last line still matches run.json's
    metrics, so only the recorded sha256 catches it."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "test_accuracy": 0.99})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="sha256"):
        read_metrics(copy, load_record(copy / "run.json"))
