"""``pipeline audit -- CMD`` and ``pipeline exec -- CMD``: a user's own,
unchanged training script run under simulated machines (audit) or under the
pinned numeric profile (exec).

The audit runs CMD twice on this machine as it is (run-to-run), once per
simulated machine (pipeline.audit.machines, the determinism suite's), then under the
pinned profile on this machine and on every machine that diverged; each run
stops after ``--steps`` optimizer steps (pipeline.audit.child runs them,
pipeline.audit.capture records them) and pipeline.audit.report compares the trails
and writes the report. ``exec`` runs CMD once under the profile, to the end,
and writes its record (toolchain, profile, final weight hash) beside the
script's own outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..core.environment import Profile, check_host, load_profile
from ..core.errors import ProfileError, UsageError
from . import contain
from .child import (
    REFERENCE,
    Outcome,
    Plan,
    boot_dir,
    capture_env,
    pinned_env,
    places,
    plan,
    run_child,
)
from .report import report, same, text

__all__ = ["add_commands", "run", "audit", "exec_script", "DEFAULT_STEPS", "DEFAULT_TIMEOUT_S"]

DEFAULT_STEPS = 10
DEFAULT_TIMEOUT_S = 300.0


def add_commands(sub: Any) -> None:
    """``audit`` and ``exec``, on the CLI's subparsers."""
    a = sub.add_parser("audit", help="is your own training script reproducible, and where "
                                     "does it diverge? (pipeline audit -- python train.py)")
    a.add_argument("--machines", default=None,
                   help="comma-separated machine names (default: all but 'everything')")
    a.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps per run (default {DEFAULT_STEPS})")
    a.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds per run before it is killed (default {DEFAULT_TIMEOUT_S:.0f})")
    a.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    a.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to audit")
    e = sub.add_parser("exec", help="run any script under the pinned numeric profile and "
                                    "record its final weight hash (pipeline exec -- python train.py)")
    e.add_argument("--record", type=Path, default=Path("pipeline-exec.json"),
                   help="where the record goes (default ./pipeline-exec.json)")
    e.add_argument("--timeout", type=float, default=None, help="seconds before it is killed")
    e.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run")


def run(args: argparse.Namespace) -> int:
    """The ``audit`` or ``exec`` command; its exit code."""
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.command == "exec":
        return exec_script(cmd, args.record, args.timeout)
    if args.steps < 1 or not 0 < args.timeout < 1e9 or args.jobs < 1:
        raise UsageError("pipeline audit: --steps and --jobs must be at least 1, --timeout "
                         "positive")
    names = [n.strip() for n in args.machines.split(",") if n.strip()] if args.machines \
        else None
    started = time.monotonic()
    stock, pinned, profile = audit(cmd, names, args.steps, args.timeout, args.jobs)
    rep = report(cmd, stock, pinned, profile, args.steps, time.monotonic() - started)
    print(json.dumps(rep, indent=2, sort_keys=True) if args.json else text(rep))
    return int(rep["exit_code"])


def audit(cmd: list[str], names: list[str] | None, steps: int, timeout: float,
          jobs: int = 1) -> tuple[list[Outcome], list[Outcome], Profile]:
    """(stock outcomes, pinned outcomes, profile). The stock runs first; then
    the pinned profile on this machine (twice if the stock runs differ from
    each other) and on every machine whose stock run diverged or failed."""
    if not cmd:
        raise UsageError("pipeline audit: no command; usage: pipeline audit [OPTIONS] -- "
                         "python your_train.py ARGS")
    profile = load_profile()
    stock_plan, skipped = plan(names)
    with tempfile.TemporaryDirectory(prefix="pipeline-audit-") as tmp:
        work = Path(tmp)
        boot_dir(work / "boot")
        where = places(work, stock_plan)

        def go(ps: list[Plan]) -> list[Outcome]:
            with ThreadPoolExecutor(max(1, jobs)) as pool:
                return list(pool.map(lambda p: run_child(p, cmd, work, where, steps,
                                                         timeout, profile), ps))

        ref = go(stock_plan[:1])[0]  # alone first: a script that fails fails once
        if ref.problem:
            return [ref], [], profile
        stock = [ref, *go(stock_plan[1:])]
        pinned_plan = [Plan("run-1", REFERENCE, True)]
        if not same(ref, stock[1]):
            pinned_plan.append(Plan("run-2", REFERENCE, True))
        pinned_plan += [Plan(o.plan.label, o.plan.machine, True) for o in stock[2:]
                        if not same(ref, o)]
        try:
            check_host(profile)
        except ProfileError as e:  # this CPU cannot run the profile: reported, not raised
            return stock + skipped, [Outcome(pl, skipped=str(e)) for pl in pinned_plan], profile
        return stock + skipped, go(pinned_plan), profile


def exec_script(cmd: list[str], record_path: Path, timeout: float | None) -> int:
    """Run ``cmd`` under the pinned profile; write its record; its exit status."""
    from ..core.atomic import write_text
    from ..core.environment import toolchain_fingerprint

    if not cmd:
        raise UsageError("pipeline exec: no command; usage: pipeline exec -- python "
                         "your_train.py ARGS")
    if timeout is not None and not 0 < timeout < 1e9:
        raise UsageError(f"pipeline exec: --timeout must be a positive number of seconds, "
                         f"found {timeout}")
    profile = load_profile()
    check_host(profile)
    with tempfile.TemporaryDirectory(prefix="pipeline-exec-") as tmp:
        rec = Path(tmp) / "record.json"
        env = capture_env(boot_dir(Path(tmp) / "boot"), rec, os.environ)
        env.update(pinned_env(profile))
        sys.stdout.flush()
        try:  # its own session, ended with everything it started (pipeline.audit.contain)
            status, timed_out = contain.run(cmd, timeout=timeout, env=env)
        except OSError as e:
            raise UsageError(f"pipeline exec: cannot run {cmd[0]!r}: {e.strerror}") from None
        if timed_out:
            print(f"pipeline exec: killed after --timeout {timeout} s", file=sys.stderr)
            status = 124  # timeout(1)'s code
        captured = json.loads(rec.read_text(encoding="utf-8")) if rec.is_file() else {}
    status = 128 - status if status < 0 else status  # killed by a signal: the shell's code
    record = {"argv": cmd, "cwd": str(Path.cwd()), "exit_status": status,
              "profile": {**profile.__dict__, "observed": captured.get("observed")},
              "seed": "Python, NumPy and torch global generators seeded from "
                      "rng.key(0, rng.EXEC, i) at start-up; the script's own seeding wins",
              "toolchain": toolchain_fingerprint(),
              "weights_sha256": captured.get("weights_sha256"),
              "optimizer_steps": captured.get("steps", 0), "weights_layout":
                  captured.get("layout", {}),
              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text(record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    sha = record["weights_sha256"]
    print(f"pipeline exec: profile {profile.name}, {record['optimizer_steps']} optimizer "
          f"steps, " + (f"weights sha256:{sha}" if sha else "no optimizer step: no weights")
          + f"; record {record_path}", file=sys.stderr)
    return status
