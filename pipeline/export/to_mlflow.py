"""``pipeline export RUN_DIR --to mlflow [--tracking-uri URI]``: one MLflow
run per pipeline run, read from the finished record.

The MLflow run holds the config flattened as params (``train.batch_size``,
...), every metric of metrics.jsonl at its step, tags for what identifies
the run (``pipeline.run_key``, the weights hash, the code, data, model and
toolchain hashes, mode, profile, the command that reproduces it), the run's
files as artifacts (run.json, weights.safetensors, metrics.jsonl,
curves.png, trail.bin, the config as config.toml, the model card), the card
as the run's description, and the model.

The model is the one ``pipeline.load`` builds (the factory imported from the
project you name, the weights checked against run.json), logged in MLflow's
``pt2`` format: ``torch.export`` of the module, which ``mlflow.pytorch.
load_model`` reloads without pickle and without the project's code. Before
the run is marked complete the logged model is reloaded and must give the
same predictions as the run's model on the first examples of the run's data.

Idempotent by the run key: a complete MLflow run tagged with the key is
reused as it is; an incomplete one (an export that died) is deleted and the
export done again; a failing export deletes its own MLflow run. MLflow's
usage telemetry is switched off for this process unless
``MLFLOW_DISABLE_TELEMETRY`` is set: the export sends nothing anywhere but
the tracking URI.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import atomic
from ..core.config import canonical_json
from ..core.errors import CheckpointError
from ..inference.loading import load_with_data
from ..recipe import manifest_path
from ..record.metrics import Epoch, read_metrics
from ..record.runs import read_run
from ..record.schema import RunRecord
from .card import card, config_toml, input_space, manifest_entries, reproduce_command
from .extras import require
from .to_tensorboard import created_s

__all__ = ["export_mlflow", "MlflowExport", "RUN_KEY_TAG", "COMPLETE_TAG", "ARTIFACTS"]

RUN_KEY_TAG = "pipeline.run_key"
COMPLETE_TAG = "pipeline.export"  # "complete" once everything is logged
ARTIFACTS = ("run.json", "weights.safetensors", "metrics.jsonl", "curves.png", "trail.bin")
_NOTE_LIMIT = 7900  # MLflow keeps tag values up to 8000 characters
_CHECK_EXAMPLES = 16


@dataclass(frozen=True)
class MlflowExport:
    """The MLflow run of a pipeline run, and whether an earlier export made it."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    reused: bool
    model_uri: str | None = None
    check: str = ""


def export_mlflow(run_dir: Path, project: Path | None, tracking_uri: str | None,
                  experiment: str) -> MlflowExport:
    """Export run ``run_dir`` to the MLflow store at ``tracking_uri`` (default:
    MLflow's own, ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow = require("mlflow", "export --to mlflow")
    require("mlflow.pytorch", "export --to mlflow")
    from mlflow.tracking import MlflowClient

    record = read_run(run_dir)
    epochs = read_metrics(run_dir, record)
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    exp_id = _experiment(client, experiment)
    done, stale = _existing(client, exp_id, record.run_key)
    if done is not None:
        return MlflowExport(done, exp_id, uri, True)
    model, ds, base = load_with_data(run_dir, project)  # checked again, with its model
    for run_id in stale:  # an export that died before it was complete
        client.delete_run(run_id)
    files = manifest_entries(manifest_path(base), record)
    note = card(record, epochs, files)
    run = client.create_run(exp_id, start_time=int(created_s(record) * 1000),
                            tags=_tags(record, note), run_name=f"pipeline-{record.run_key[:12]}")
    run_id = run.info.run_id
    try:
        _log_values(client, run_id, record, epochs)
        _log_files(client, run_id, Path(run_dir), record, note)
        model_uri, check = _log_model(mlflow, uri, run_id, model, ds)
        client.set_tag(run_id, COMPLETE_TAG, "complete")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.delete_run(run_id)  # nothing half-written: the next export starts afresh
        raise
    return MlflowExport(run_id, exp_id, uri, False, model_uri, check)


def _experiment(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # noqa: BLE001 - created meanwhile by another export
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def _existing(client: Any, exp_id: str, key: str) -> tuple[str | None, list[str]]:
    """(the complete MLflow run of ``key``, the ids of incomplete ones)."""
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
    done = [r.info.run_id for r in found if r.data.tags.get(COMPLETE_TAG) == "complete"]
    return (done[0] if done else None), [r.info.run_id for r in found
                                         if r.info.run_id not in done]


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config flattened: ``train.batch_size`` -> "32" (JSON for non-strings)."""
    out: dict[str, str] = {}
    for k, v in sorted(config.items()):
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def _tags(record: RunRecord, note: str) -> dict[str, str]:
    tags = {RUN_KEY_TAG: record.run_key, "pipeline.weights_sha256": record.weights_sha256,
            "pipeline.code_sha256": record.code_sha256 or "",
            "pipeline.config_sha256": record.config_sha256 or "",
            "pipeline.mode": record.mode, "pipeline.profile": str(record.profile.get("name")),
            "pipeline.inputs": input_space(record)[:500],
            "pipeline.toolchain_sha256": hashlib.sha256(canonical_json(record.toolchain))
            .hexdigest(),
            "pipeline.command": reproduce_command(record),
            "pipeline.data.dataset": str(record.data["dataset"]),
            "mlflow.note.content": note if len(note) <= _NOTE_LIMIT else
            note[:_NOTE_LIMIT] + "\n\n(cut: the whole card is the artifact MODEL_CARD.md)"}
    tags.update({f"pipeline.toolchain.{k}": str(v) for k, v in record.toolchain.items()})
    tags.update({f"pipeline.data.{k}.sha256": v for k, v in record.data["files"].items()})
    tags.update({f"pipeline.data_decoded.{k}": str(v)
                 for k, v in (record.data_decoded or {}).items()})
    tags.update({f"pipeline.model.{k}": str(v) for k, v in (record.model or {}).items()})
    return tags


def _log_values(client: Any, run_id: str, record: RunRecord, epochs: list[Epoch]) -> None:
    """Params and every metric at its step, in batches MLflow accepts."""
    from mlflow.entities import Metric, Param

    when = int(created_s(record) * 1000)
    params = [Param(k, v) for k, v in flat_params(record.config).items()]
    metrics = [Metric(k, v, when, e.step) for e in epochs for k, v in sorted(e.values.items())]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def _log_files(client: Any, run_id: str, run_dir: Path, record: RunRecord, note: str) -> None:
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name), "run")
    with tempfile.TemporaryDirectory(prefix="pipeline-export-") as tmp:
        atomic.write_text(Path(tmp) / "config.toml", config_toml(record.config))
        atomic.write_text(Path(tmp) / "MODEL_CARD.md", note)
        client.log_artifact(run_id, str(Path(tmp) / "config.toml"))
        client.log_artifact(run_id, str(Path(tmp) / "MODEL_CARD.md"))


def _log_model(mlflow: Any, uri: str, run_id: str, model: Any, ds: Any) -> tuple[str, str]:
    """Log ``model.module`` (pt2), reload it and compare its logits with the
    run's model on the first examples of the run's data; (model URI, check)."""
    import numpy as np
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from ..exact import native
    from ..train.loop import examples_of

    ctx = int(model.record.config["data"]["context"])
    n = min(_CHECK_EXAMPLES, ds.counts(ctx)[0])
    x, _ = examples_of(ds, ctx, torch.device("cpu")).get(np.arange(n))
    want = model.predict(x)
    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(str(x.dtype).removeprefix("torch.")),
                                  (-1, *x.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, *want.shape[1:]))]))
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)  # log_model logs to the active run of the global URI
    try:
        # torch.export traces exact layers' torch implementations (native kernels: same bits)
        with native.torch_only(), mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model.module.eval(), name="model", serialization_format="pt2",
                input_example=x[:2].numpy(), signature=sig,
                pip_requirements=[f"torch=={torch.__version__}",
                                  f"mlflow-skinny=={mlflow.__version__}"],
                metadata={RUN_KEY_TAG: model.record.run_key,
                          "pipeline.weights_sha256": model.record.weights_sha256,
                          "pipeline.inputs": input_space(model.record),
                          **({"pipeline.standardize": model.record.data["standardize"]}
                             if model.record.data.get("standardize") else {})})
        with torch.no_grad():
            got = mlflow.pytorch.load_model(info.model_uri)(x)
    finally:
        mlflow.set_tracking_uri(before)
    return info.model_uri, _check(got, want, info.model_uri)


def _check(got: Any, want: Any, uri: str) -> str:
    """"identical", or the largest difference; CheckpointError if a prediction
    (the arg max) differs: the logged model would not be the run's."""
    import torch

    if torch.equal(got, want):
        return "identical"
    if got.shape != want.shape or not torch.equal(got.argmax(-1), want.argmax(-1)):
        raise CheckpointError(uri, "a logged model that predicts as the run's model",
                              "other predictions on the run's first examples")
    return f"max |difference| {float((got - want).abs().max()):.3g}, same predictions"
