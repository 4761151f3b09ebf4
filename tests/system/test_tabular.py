"""examples/tabular: a real-valued table (UCI breast cancer) trained with
per-column standardisation (data.standardize), from its own project
directory; the statistics recorded, keyed, checked when the run is used, and
applied to raw rows by `pipeline predict`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.standardize import Standardizer

from ..support import ROOT, cli_main, pipeline_env, run_pipeline

PROJECT = ROOT / "examples" / "tabular"
SHORT = ["train.epochs=4"]


def _train(tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
           *overrides: str) -> tuple[Path, dict]:
    monkeypatch.chdir(PROJECT)
    runs = tmp / "runs"
    code = cli_main(["train", *SHORT, *overrides, "--runs-dir", str(runs), "--json",
                     "--quiet"], monkeypatch, tmp)
    out = capsys.readouterr().out
    assert code == 0, out
    rec = json.loads(out)
    return runs / rec["run_key"], rec


def test_standardised_table_trains_records_and_predicts_raw_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The project's config (standardize = true) trains from its own directory;
    run.json's data.standardize holds the training split's statistics; `eval`
    gives the recorded accuracy bit for bit; `predict` on raw CSV rows gives
    the predictions of the standardised rows (control: not of the raw ones).
    Without standardisation: another key, and a far worse model."""
    run, rec = _train(tmp_path, monkeypatch, capsys)
    st = Standardizer.from_json(rec["data"]["standardize"], "run.json")
    assert st.rows == 456 and len(st.mean) == 30 and st.mean[3] > 100  # area: hundreds
    plain_run, plain = _train(tmp_path, monkeypatch, capsys, "data.standardize=false")
    assert "standardize" not in plain["data"] and plain["run_key"] != rec["run_key"]
    assert "standardize" not in plain["config"]["data"]  # its default is not keyed
    assert rec["metrics"]["test_accuracy"] > plain["metrics"]["test_accuracy"] + 0.1

    assert cli_main(["eval", str(run)], monkeypatch, tmp_path) == 0
    assert "identical" in capsys.readouterr().out
    assert cli_main(["eval", str(run), "data.standardize=false"], monkeypatch, tmp_path) == 2
    assert "not an eval override" in capsys.readouterr().err

    raw = np.loadtxt(PROJECT / "data" / "breast_cancer.csv", delimiter=",", skiprows=1)[:, :30]
    rows = tmp_path / "rows.csv"
    np.savetxt(rows, raw, delimiter=",", fmt="%.17g")
    assert cli_main(["predict", str(run), str(rows)], monkeypatch, tmp_path) == 0
    got = [json.loads(line)["class"] for line in io.StringIO(capsys.readouterr().out)]

    import pipeline

    model = pipeline.load(run, PROJECT)
    x32 = raw.astype(np.float32)
    want = model.predict(model.standardizer.apply(x32)).argmax(1).tolist()
    assert got == want
    assert want != model.predict(x32).argmax(1).tolist()  # control: raw rows predict otherwise


def test_a_validation_split_is_scored_every_epoch_and_held_out_of_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """data.val_fraction: val_accuracy per epoch in metrics.jsonl, the last in
    run.json's metrics, a green curve in curves.png; the standardisation
    statistics come from the examples that train (not the validation ones);
    another key than without it. A fraction too small for one example: exit 2."""
    from pipeline.record.plots import GREEN

    run, rec = _train(tmp_path, monkeypatch, capsys, "data.val_fraction=0.2")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(0.5 < m["val_accuracy"] <= 1 for m in lines)
    assert rec["metrics"]["val_accuracy"] == lines[-1]["val_accuracy"]
    assert rec["data"]["standardize"]["rows"] == 456 - 91  # floor(456 * 0.2) held out
    assert bytes(GREEN) in _pixels(run / "curves.png")
    plain_run, plain = _train(tmp_path, monkeypatch, capsys)
    assert plain["run_key"] != rec["run_key"] and "val_accuracy" not in plain["metrics"]
    assert bytes(GREEN) not in _pixels(plain_run / "curves.png")  # control
    monkeypatch.chdir(PROJECT)
    assert cli_main(["train", "data.val_fraction=0.001", "--runs-dir", str(tmp_path / "r"),
                     "--quiet"], monkeypatch, tmp_path) == 2
    assert "empty validation split" in capsys.readouterr().err


def _pixels(png: Path) -> bytes:
    """The raw RGB rows of one of pipeline.record.plots' PNGs (one IDAT)."""
    import zlib

    blob = png.read_bytes()
    i = blob.index(b"IDAT")
    n = int.from_bytes(blob[i - 4:i], "big")
    return zlib.decompress(blob[i + 4:i + 4 + n])


@pytest.mark.process
@pytest.mark.slow
def test_standardised_weights_are_the_same_at_threads_and_world_sizes(tmp_path: Path) -> None:
    """One hash at --threads 1 and 2 and --nproc 2, pinned and exact, with a
    validation split (fresh processes, from the project directory)."""
    env = pipeline_env(tmp_path)
    for mode in ("pinned", "exact"):
        hashes = set()
        for extra in (["--threads", "1"], ["--threads", "2"], ["--nproc", "2"]):
            p = run_pipeline(["train", f"mode={mode}", *SHORT, "data.val_fraction=0.1",
                              *extra, "--runs-dir",
                              str(tmp_path / f"runs{len(hashes)}{mode}{extra[-1]}{extra[0]}"),
                              "--json", "--quiet"], env, PROJECT, timeout=600)
            assert p.returncode == 0, p.stderr[-2000:]
            hashes.add(json.loads(p.stdout)["weights_sha256"])
        assert len(hashes) == 1, (mode, hashes)
