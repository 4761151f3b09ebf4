"""`pipeline export RUN --to mlflow` (pipeline/export/to_mlflow.py) against a
real local MLflow store (SQLite, made by the test), read back with MLflow's
own client: one MLflow run per pipeline run with its params, per-step
metrics, tags and files; its logged model reloads (mlflow.pytorch and
mlflow.pyfunc) and gives the run's predictions bit for bit; a second export
makes no second run; a failed export leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pipeline
from pipeline.export import to_mlflow

from ..support import ROOT, charlm_run, cli_main, run_pipeline, train_here

CHARLM = ROOT / "examples" / "charlm"


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _client(db: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{db}")


def _runs(db: Path) -> list[Any]:
    client = _client(db)
    exp = client.get_experiment_by_name("pipeline")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _export(run: Path, db: Path, cwd: Path, env: dict[str, str], *extra: str) -> str:
    p = run_pipeline(["export", str(run), "--to", "mlflow", "--tracking-uri", f"sqlite:///{db}",
                      *extra], env, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _examples(model: Any, n: int = 8) -> torch.Tensor:
    """The first ``n`` windows of the run's text, as the model takes them."""
    text = (ROOT / "data" / "shakespeare.txt").read_text()[:n * model.context]
    index = {c: i for i, c in enumerate(model.shapes.vocabulary)}
    return torch.tensor([index[c] for c in text]).reshape(n, model.context)


@pytest.mark.process
def test_charlm_run_in_a_fresh_mlflow_store(shared_dir: Path, suite_env: dict[str, str],
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """The charlm run exported to a new SQLite store: MLflow's client reads back
    the config as params, each metrics.jsonl value at its step, the identifying
    tags and the run's files; the logged model, reloaded by mlflow.pytorch and
    mlflow.pyfunc, gives pipeline.load's logits bit for bit; exporting again
    reuses the MLflow run."""
    import mlflow.pyfunc
    import mlflow.pytorch

    run, db = charlm_run(shared_dir, suite_env), tmp_path / "mlflow.db"
    env = {**suite_env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = _export(run, db, tmp_path, env, "--project", str(CHARLM))
    assert "exported" in out and "logits identical" in out
    (found,) = _runs(db)
    rec = json.loads((run / "run.json").read_text())
    assert found.data.params["train.max_steps"] == "20"
    assert found.data.params == to_mlflow.flat_params(rec["config"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    client = _client(db)
    for key in ("train_loss", "test_loss", "epoch"):
        history = client.get_metric_history(found.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(x["step"], x[key]) for x in lines]
    tags = found.data.tags
    assert tags["pipeline.run_key"] == rec["run_key"]
    assert tags["pipeline.weights_sha256"] == rec["weights_sha256"]
    assert tags["pipeline.code_sha256"] == rec["code_sha256"]
    assert tags["pipeline.data.shakespeare.sha256"] == rec["data"]["files"]["shakespeare"]
    assert tags["pipeline.toolchain.lock"] == rec["toolchain"]["lock"]
    assert tags["pipeline.mode"] == "pinned" and tags["pipeline.export"] == "complete"
    assert tags["pipeline.command"].startswith("pipeline train config.toml")
    assert rec["run_key"] in tags["mlflow.note.content"]  # the card, as the description
    files = {a.path for a in client.list_artifacts(found.info.run_id, "run")}
    assert {"run/run.json", "run/weights.safetensors", "run/metrics.jsonl"} <= files

    uri = f"models:/{found.outputs.model_outputs[0].model_id}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")  # where models:/ resolves
    monkeypatch.setenv("PIPELINE_CACHE_DIR", suite_env["PIPELINE_CACHE_DIR"])
    model = pipeline.load(run, CHARLM)
    x = _examples(model)
    with torch.no_grad():
        assert torch.equal(mlflow.pytorch.load_model(uri)(x), model.predict(x))
    got = mlflow.pyfunc.load_model(uri).predict(x.numpy())
    assert np.array_equal(np.asarray(got), model.predict(x).numpy())

    again = _export(run, db, tmp_path, env, "--project", str(CHARLM))
    assert f"mlflow run {found.info.run_id} already exported" in again
    assert len(_runs(db)) == 1


@pytest.mark.process
def test_exact_run_of_a_users_model(tmp_path: Path, suite_env: dict[str, str]) -> None:
    """A `pipeline new` project trained in exact mode (its convnet as exact
    layers): the export logs a model that reloads and gives the exact run's
    logits bit for bit (the check the export itself makes, and pipeline.load's
    weights hash round-trips from the project)."""
    project = tmp_path / "project"
    env = {**suite_env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    assert run_pipeline(["new", str(project)], env).returncode == 0
    p = run_pipeline(["train", "config.toml", "mode=exact", "train.max_steps=3",
                      "model.args.channels=2", "--json", "--quiet"], env, cwd=project)
    assert p.returncode == 0, p.stderr[-3000:]
    run = project / "runs" / json.loads(p.stdout)["run_key"]
    out = _export(run, tmp_path / "mlflow.db", project, env)
    assert "logits identical" in out
    code = ("import pipeline, sys; print(pipeline.load(sys.argv[1]).weights_sha256())")
    got = run_pipeline_python(code, run, env, project)
    assert got == json.loads(p.stdout)["weights_sha256"]


def run_pipeline_python(code: str, arg: Path, env: dict[str, str], cwd: Path) -> str:
    """``python -c CODE ARG`` in ``cwd``: its stdout, stripped."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", code, str(arg)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip()


@pytest.mark.slow
def test_a_failed_export_leaves_nothing_and_a_stale_run_is_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An export that fails while logging the model deletes its MLflow run (no
    active run is left); an incomplete run of the same key, as a killed export
    leaves, is deleted by the next export, which leaves exactly one run."""
    run = train_here(tmp_path / "runs", ["train.epochs=2"], tmp_path)
    db = tmp_path / "mlflow.db"
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    argv = ["export", str(run), "--to", "mlflow", "--tracking-uri", f"sqlite:///{db}",
            "--project", str(ROOT)]

    def fail(*_: Any) -> Any:
        raise RuntimeError("disk full while logging the model")

    with monkeypatch.context() as m:
        m.setattr(to_mlflow, "_log_model", fail)
        assert cli_main(argv, monkeypatch, tmp_path) == 70
    assert _runs(db) == []
    client = _client(db)
    exp = client.get_experiment_by_name("pipeline").experiment_id
    stale = client.create_run(exp, tags={to_mlflow.RUN_KEY_TAG: run.name}).info.run_id
    assert cli_main(argv, monkeypatch, tmp_path) == 0
    (found,) = _runs(db)
    assert found.info.run_id != stale and found.data.tags[to_mlflow.COMPLETE_TAG] == "complete"
    assert "logits identical" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "mlruns")
