"""Child runs of ``pipeline audit`` and ``pipeline exec``: the plan (which
machines), the child's environment, one run with a timeout in its own
session, and what it recorded.

A child is a user's unchanged command started with a ``sitecustomize.py``
first on its PYTHONPATH that loads pipeline.audit.capture, which records every
optimizer step (a trail row: 8 bytes of SHA-1 per parameter) and the final
weights' canonical hash. CMD runs in the current directory, so it should not
resume from outputs of its own earlier runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.environment import Profile, host_isa_levels
from ..core.errors import UsageError
from . import contain
from . import machines as mach

__all__ = ["Plan", "Outcome", "REFERENCE", "plan", "run_child", "places", "boot_dir",
           "capture_env", "pinned_env"]

_PKG_PARENT = Path(__file__).resolve().parents[2]  # the directory holding pipeline/
_SITE = '''# Written by `pipeline audit`/`pipeline exec` (pipeline/audit/commands.py): load the step capture.
import importlib.util
import sys
if importlib.util.find_spec("pipeline") is None:
    sys.path.append({parent!r})
import pipeline.audit.capture
pipeline.audit.capture.boot(__file__)
'''
REFERENCE = mach.Machine("this-machine", kind="run-to-run", what="this machine as it is")


@dataclass(frozen=True)
class Plan:
    """One child run: ``label`` on ``machine``, stock or under the pinned profile."""
    label: str
    machine: mach.Machine
    pinned: bool = False


@dataclass
class Outcome:
    """How one child run ended, and what its capture recorded."""
    plan: Plan
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    record: dict[str, Any] | None = None
    stderr_tail: list[str] = field(default_factory=list)
    skipped: str | None = None  # why this run was not started
    limit_s: float = 0.0

    @property
    def problem(self) -> str | None:
        """Why this run cannot be compared, or None."""
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.timed_out:
            return f"did not finish within --timeout {self.limit_s:g} s (killed)"
        if self.returncode not in (0, None):
            return f"exited with status {self.returncode}"
        r = self.record
        if r is None:
            return ("no capture record: is the command a Python interpreter that honours "
                    "PYTHONPATH (no -I, -E or -S)?")
        if not r["torch_imported"]:
            return "never imported torch"
        if r["steps"] == 0:
            return "never called torch.optim.Optimizer.step"
        return None


def boot_dir(where: Path) -> Path:
    """A directory holding the sitecustomize.py that loads pipeline.audit.capture."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "sitecustomize.py").write_text(_SITE.format(parent=str(_PKG_PARENT)),
                                            encoding="utf-8")
    return where


def capture_env(boot: Path, record: Path, base: Mapping[str, str], *, steps: int = 0,
                trail: bool = False, seed: int | None = None) -> dict[str, str]:
    """The capture's variables (pipeline.audit.capture) over ``base``, without any
    PIPELINE_AUDIT_* the parent itself inherited."""
    env = {k: v for k, v in base.items() if not k.startswith("PIPELINE_AUDIT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(boot), base.get("PYTHONPATH")]))
    env["PIPELINE_AUDIT_RECORD"] = str(record)
    if steps:
        env["PIPELINE_AUDIT_STEPS"] = str(steps)
    if trail:
        env["PIPELINE_AUDIT_TRAIL"] = "1"
    if seed is not None:
        env["PIPELINE_AUDIT_SEED"] = str(seed)
    return env


def pinned_env(profile: Profile) -> dict[str, str]:
    """What `pipeline exec` sets over a machine's environment: the profile's
    variables (read when the interpreter, OpenMP and MKL load, so they must
    precede the interpreter: pytorch issue 15359) and the seed of the
    script's unseeded global generators."""
    return {**profile.env, "PIPELINE_AUDIT_SEED": "0"}


def plan(names: list[str] | None) -> tuple[list[Plan], list[Outcome]]:
    """The stock runs of an audit (run-to-run first), and the machines skipped
    here with why. ``names``: machine names (None: every machine but "everything")."""
    known = {m.name: m for m in mach.MACHINES}
    bad = [n for n in names or [] if n not in known]
    if bad:
        raise UsageError(f"--machines: unknown machine(s) {bad}; expected names from "
                         f"{sorted(known)}")
    chosen = [known[n] for n in names] if names else [m for m in mach.MACHINES
                                                       if m.kind != "several"]
    runs = [Plan("run-1", REFERENCE), Plan("run-2", REFERENCE)]
    skipped = []
    levels = host_isa_levels()
    for m in chosen:
        why = m.missing_tool() or (f"this CPU lacks {m.isa.upper()}"
                                   if m.isa and m.isa not in levels else None)
        if why:
            skipped.append(Outcome(Plan(m.name, m), skipped=why))
        else:
            runs.append(Plan(m.name, m))
    return runs, skipped


def run_child(p: Plan, cmd: list[str], work: Path, places: mach.Places, steps: int,
              timeout: float, profile: Profile) -> Outcome:
    """Run ``cmd`` once as ``p`` says, in its own session (ended afterwards,
    DataLoader workers and all); its stdout and stderr go to files."""
    tag = f"{p.label}{'-pinned' if p.pinned else ''}"
    scratch = work / tag
    scratch.mkdir(parents=True, exist_ok=True)
    if p.pinned and not p.machine.can_run(profile.requires_isa):
        return Outcome(p, skipped=f"profile {profile.name} needs "
                                  f"{profile.requires_isa.upper()}, which this machine lacks")
    base = capture_env(work / "boot", scratch / "record.json", os.environ, steps=steps,
                       trail=True)
    extra = pinned_env(profile) if p.pinned else {}
    cwd = places.checkout if p.machine.cwd == "checkout" else places.repo
    if p.machine.cwd == "checkout":
        extra["PWD"] = str(cwd)
    env = mach.environment(p.machine, base, places, scratch, extra)
    out = Outcome(p, limit_s=timeout)
    started = time.monotonic()
    with open(scratch / "stdout", "wb") as so, open(scratch / "stderr", "wb") as se:
        try:
            code, out.timed_out = contain.run(mach.wrap(p.machine, cmd), timeout=timeout,
                                              cwd=cwd, env=env, stdout=so, stderr=se,
                                              stdin=subprocess.DEVNULL)
            out.returncode = None if out.timed_out else code
        except OSError as e:
            se.write(f"cannot start {cmd[0]!r}: {e.strerror}\n".encode())
            out.returncode = 127  # the shell's "command not found"
    out.seconds = round(time.monotonic() - started, 2)
    out.stderr_tail = (scratch / "stderr").read_text(errors="replace").splitlines()[-15:]
    if (scratch / "record.json").is_file():
        out.record = json.loads((scratch / "record.json").read_text(encoding="utf-8"))
    return out


def places(work: Path, chosen: list[Plan]) -> mach.Places:
    """This directory, a link to it under an odd path, and compiled locales
    (only when a locale machine is planned)."""
    link = work / "chemin é ü" / "work dir"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path.cwd(), target_is_directory=True)
    if any("LOCPATH" in p.machine.env for p in chosen):
        mach.compile_locales(work / "locales")
    return mach.Places(Path.cwd(), link, work / "locales")
