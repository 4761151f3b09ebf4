"""``pipeline eval RUN_DIR [data.KEY=VALUE ...]``: a run's model scored on a
test split, computed as the training loop computes its test metric
(pipeline.train.loop.score). Without overrides it is the run's own split and
gives the recorded metric again (the same bits under the run's numeric
profile); ``data.*`` overrides score it on another split or dataset of the
project, which must have the shapes (and a text dataset the vocabulary) the
model was built for. Only ``data.*`` keys: the model is the run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import Config, config_from_dict, parse_overrides
from ..core.errors import ConfigError, UsageError
from .loading import dataset_for, load_with_data

__all__ = ["Evaluation", "evaluate", "eval_config"]


@dataclass(frozen=True)
class Evaluation:
    """A score: the metric, its value on ``examples`` test examples of
    ``dataset``, and the run's recorded value (None when scored on other data)."""

    run_key: str
    dataset: str
    metric: str
    value: float
    examples: int
    recorded: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def eval_config(record_config: dict[str, Any], overrides: list[str], where: str) -> Config:
    """The run's config with ``data.*`` overrides; UsageError for any other key."""
    other = [o for o in overrides if not o.partition("=")[0].strip().startswith("data.")]
    if other:
        raise UsageError(f"{other[0]}: eval takes data.* overrides only (the model is the "
                         f"run's: its model, train and optim keys are fixed)")
    if any(o.partition("=")[0].strip() == "data.standardize" for o in overrides):
        raise UsageError("data.standardize: the model's inputs are standardised as the run's "
                         "were (its statistics, from its own training split); it is not an "
                         "eval override")
    data = {**record_config["data"], **parse_overrides(overrides).get("data", {})}
    return config_from_dict({**record_config, "data": data}, f"{where} with {overrides}")


def evaluate(run_dir: Path, overrides: list[str], project: Path | None) -> Evaluation:
    """Score the run's model (``pipeline.load``'s checks) on the test split of
    its config with ``overrides``."""
    from ..train.loop import score

    model, ds, base = load_with_data(run_dir, project)
    record = model.record
    cfg = eval_config(record.config, overrides, str(Path(run_dir) / "run.json"))
    own = cfg.data == config_from_dict(record.config, "run.json").data
    if cfg.data.dataset != ds.name:
        ds = dataset_for(cfg, base, None, Path(run_dir), model.standardizer)
    _check_fits(model.shapes, ds, cfg)
    metric, value, n = score(model.net, ds, cfg)
    recorded = record.metrics.get(metric) if own else None
    return Evaluation(record.run_key, ds.name, metric, value, n, recorded)


def _check_fits(shapes: Any, ds: Any, cfg: Config) -> None:
    """ConfigError unless ``ds`` gives the model inputs and classes it was built for."""
    problems = []
    if ds.task != shapes.task:
        problems.append(f"data.dataset: {ds.name!r} is for {ds.task.name}, the model for "
                        f"{shapes.task.name}")
    elif (wrong := ds.task.context_problem(cfg.data.context, ds.name)) is not None:
        problems.append(wrong)
    else:
        shape, classes = ds.shapes(cfg.data.context)
        if shapes.task.windows and cfg.data.context > shapes.input_shape[0]:
            problems.append(f"data.context: expected at most the run's {shapes.input_shape[0]} "
                            f"tokens, found {cfg.data.context}")
        elif shapes.task.windows and ds.vocabulary != shapes.vocabulary:
            problems.append(f"data.dataset: {ds.name!r} has another vocabulary ({classes} "
                            f"tokens) than the model's ({shapes.num_classes})")
        elif not shapes.task.windows and (shape, classes) != (shapes.input_shape,
                                                              shapes.num_classes):
            problems.append(f"data.dataset: {ds.name!r} has inputs {shape} and {classes} "
                            f"classes; the model takes {shapes.input_shape} and "
                            f"{shapes.num_classes}")
    if problems:
        raise ConfigError(f"eval on {ds.name!r}", problems)
