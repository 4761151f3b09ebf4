"""``pipeline export`` and ``pipeline card``: the CLI's side of this package
(nothing heavy imported here: the CLI loads it before any command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core import atomic
from ..core.errors import UsageError

__all__ = ["add_commands", "run"]

_PROJECT_HELP = ("the project the run was trained in (the directory of its config, or the "
                 "config file): its model code and data manifest; default: the project "
                 "around the current directory. Code is never imported from the run "
                 "directory")


def add_commands(sub: Any) -> None:
    """``export`` and ``card``, on the CLI's subparsers."""
    x = sub.add_parser("export", help="export a finished run to MLflow or TensorBoard (the "
                                      "export extra: requirements-export.lock)")
    x.add_argument("run_dir", type=Path, help="a run directory (runs/<run_key>)")
    x.add_argument("--to", nargs="+", required=True, metavar="TARGET",
                   help="mlflow, or tensorboard DIR (event files under DIR/<run_key>)")
    x.add_argument("--tracking-uri", default=None,
                   help="MLflow's tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's "
                        "default, sqlite:///mlflow.db)")
    x.add_argument("--experiment", default="pipeline",
                   help="the MLflow experiment (created if absent; default: pipeline)")
    x.add_argument("--project", type=Path, default=None, help=_PROJECT_HELP)
    c = sub.add_parser("card", help="write a run's model card (Markdown): model, data with "
                                    "hashes and licences, metrics, the command and toolchain")
    c.add_argument("run_dir", type=Path, help="a run directory (runs/<run_key>)")
    c.add_argument("--out", type=Path, default=None,
                   help="write the card here (atomically) instead of to stdout")
    c.add_argument("--project", type=Path, default=None,
                   help="the project whose data-manifest.json gives each file's source and "
                        "licence (default: the project around the current directory)")


def run(args: argparse.Namespace) -> int:
    """Carry out ``export`` or ``card``; the exit status."""
    if args.command == "card":
        return _card(args)
    target, *rest = args.to
    if target == "mlflow" and not rest:
        return _mlflow(args)
    if target == "tensorboard" and len(rest) == 1:
        return _tensorboard(args, Path(rest[0]))
    raise UsageError(f"--to {' '.join(args.to)}: expected `--to mlflow` or "
                     f"`--to tensorboard DIR`")


def _mlflow(args: argparse.Namespace) -> int:
    from .to_mlflow import export_mlflow

    got = export_mlflow(args.run_dir, args.project, args.tracking_uri, args.experiment)
    state = "already exported (reused)" if got.reused else "exported"
    print(f"mlflow run {got.run_id} {state}: experiment {got.experiment_id} at "
          f"{got.tracking_uri}")
    if got.model_uri:
        print(f"model {got.model_uri}: reloaded, logits {got.check}")
    return 0


def _tensorboard(args: argparse.Namespace, logdir: Path) -> int:
    from .to_tensorboard import export_tensorboard

    got = export_tensorboard(args.run_dir, logdir)
    scalars = ", ".join(f"{k} ({n})" for k, n in sorted(got.scalars.items()))
    print(f"tensorboard: {got.directory}: {scalars}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from ..project import find
    from ..recipe import manifest_path
    from ..record.metrics import read_metrics
    from ..record.runs import read_run
    from .card import card, manifest_entries

    record = read_run(args.run_dir)
    base = args.project or find(Path.cwd()) or Path.cwd()
    base = base.parent if base.is_file() else base
    text = card(record, read_metrics(args.run_dir, record),
                manifest_entries(manifest_path(base), record))
    if args.out is None:
        print(text, end="")
    else:
        atomic.write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0
