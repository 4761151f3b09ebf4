"""``pipeline eval`` and ``pipeline predict``: the CLI's side of this package.

Both pin the process the way the run's mode does before torch is imported
(pinned mode re-executes under the numeric profile, as ``train`` does), so
that a pinned run's logits are computed by the kernels that trained it: eval
on the run's own split gives the recorded metric again, bit for bit. Nothing
heavy is imported by this module itself (the CLI loads it before pinning).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .. import modes
from ..core import atomic
from ..record.schema import RunRecord, load_record

__all__ = ["add_commands", "run"]

_PROJECT_HELP = ("the project the run was trained in: the directory of its config (or the "
                 "config file), where its model code and data manifest are; default: the "
                 "project around the current directory. Code is never imported from the run "
                 "directory")


def add_commands(sub: Any) -> None:
    """``eval`` and ``predict``, on the CLI's subparsers."""
    e = sub.add_parser("eval", help="score a run's model on its test split again (the "
                                    "recorded metric), or on another dataset (data.KEY=VALUE)")
    e.add_argument("run_dir", type=Path, help="a run directory (runs/<run_key>)")
    e.add_argument("args", nargs="*", metavar="data.KEY=VALUE",
                   help="overrides of the run's data keys (dataset, test_fraction, context)")
    e.add_argument("--project", type=Path, default=None, help=_PROJECT_HELP)
    e.add_argument("--json", action="store_true", help="print the score as JSON")
    p = sub.add_parser("predict", help="write a run's model's predictions for an input file "
                                       "(.npy/.csv rows, or text), one JSON object a line")
    p.add_argument("run_dir", type=Path, help="a run directory (runs/<run_key>)")
    p.add_argument("file", type=Path, help="raw inputs as the run's data holds them: .npy or "
                                           ".csv rows (classification), text (language model)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the predictions here (atomically) instead of to stdout")
    p.add_argument("--project", type=Path, default=None, help=_PROJECT_HELP)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Carry out ``eval`` or ``predict``; the exit status."""
    _pin(args.run_dir, argv)
    if args.command == "eval":
        return _eval(args)
    return _predict(args)


def _pin(run_dir: Path, argv: list[str]) -> RunRecord:
    """Prepare the process as the run's mode does (pinned mode may re-execute);
    note on stderr when this profile is not the one the run trained under."""
    record = load_record(Path(run_dir) / "run.json")  # JSON only: torch is not loaded yet
    profile = modes.of(record.mode).prepare(argv)
    if profile.get("name") != record.profile.get("name"):
        print(f"note: the run trained under profile {record.profile.get('name')}, this "
              f"process runs {profile.get('name')}: logits may differ in the last bits",
              file=sys.stderr)
    return record


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    got = evaluate(args.run_dir, args.args, args.project)
    # The run's own split scored otherwise than recorded is a mismatch (exit 1),
    # as verify's: the same weights and data must give the same bits.
    differs = got.recorded is not None and got.recorded != got.value
    if args.json:
        print(json.dumps(got.to_json(), indent=2, sort_keys=True))
        return 1 if differs else 0
    name = got.metric.removeprefix("test_").replace("_", " ")
    print(f"run {got.run_key} on {got.dataset}: test {name} {got.value:.4f} "
          f"({got.examples} test examples)")
    if got.recorded is not None:
        same = "differs" if differs else "identical"
        print(f"recorded {got.recorded:.4f}: {same} ({got.value!r} vs {got.recorded!r})")
    return 1 if differs else 0


def _predict(args: argparse.Namespace) -> int:
    import io

    from ..project import check_out
    from .loading import load
    from .predict import predict_file

    out = check_out(args.out, args.run_dir) if args.out is not None else None
    model = load(args.run_dir, args.project)
    if args.out is None:
        predict_file(model, args.file, sys.stdout)
        return 0
    buf = io.StringIO()
    n = predict_file(model, args.file, buf)
    atomic.write_text(out, buf.getvalue())
    print(f"wrote {n} predictions: {args.out}")
    return 0
