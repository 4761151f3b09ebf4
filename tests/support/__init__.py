"""Running the pipeline as a user would: a fresh process, a chosen environment;
or in this process (``cli_main``). Shared by every test; ``support.data`` and
``support.machines`` hold the data and simulated-machine helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]  # the checkout (this is tests/support/)
SOURCE_PARTS = ("pipeline", "configs", "data", "data-manifest.json", "requirements.lock",
                "pyproject.toml", "examples")


def pipeline_env(tmp: Path, *, clean: bool = False, **extra: str) -> dict[str, str]:
    """The current environment with a private data cache and the given extras;
    ``clean``: without PIPELINE_* variables and PYTHONPATH (a user's shell)."""
    env = {k: v for k, v in os.environ.items()
           if not (clean and (k.startswith("PIPELINE_") or k == "PYTHONPATH"))}
    env["PIPELINE_CACHE_DIR"] = str(tmp / "cache")
    env.update(extra)
    return env


def pipeline_argv(*args: str) -> list[str]:
    """``python -m pipeline ARGS`` with this interpreter."""
    return [sys.executable, "-m", "pipeline", *args]


def run_pipeline(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
                 timeout: float | None = 300, check: bool = False
                 ) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS`` to its end, output captured (text); ``env``
    None inherits this process's environment."""
    return subprocess.run(pipeline_argv(*args), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=check)


def start_pipeline(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
                   **popen: Any) -> subprocess.Popen[str]:
    """Start ``python -m pipeline ARGS``, stdout and stderr piped; the caller waits."""
    return subprocess.Popen(pipeline_argv(*args), cwd=cwd, env=env, text=True,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen})


def train_json(overrides: list[str], runs: Path, env: dict[str, str],
               cwd: Path = ROOT, config: str | Path = "configs/digits.toml",
               timeout: float = 300) -> dict[str, Any]:
    """Train ``config`` (configs/digits.toml) with overrides; return run.json (or
    fail loudly)."""
    p = run_pipeline(["train", str(config), *overrides, "--runs-dir", str(runs),
                      "--json", "--quiet"], env, cwd, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return json.loads(p.stdout)


def assert_close(got: Any, want: Any, rel: float, what: str = "") -> None:
    """Elementwise within ``rel`` of the reference's largest magnitude (NumPy
    arrays, numbers or tensors, compared in float64)."""
    import numpy as np

    got, want = (np.asarray(v.detach().numpy() if hasattr(v, "detach") else v, dtype=np.float64)
                 for v in (got, want))
    assert got.shape == want.shape, (what, got.shape, want.shape)
    tol = rel * max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want).max()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def cli_main(argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp: Path | None = None) -> int:
    """``pipeline ARGV`` in this process, unpinned (``unpin``); its exit status.
    The user modules it imports are forgotten afterwards (sys.path and
    sys.modules as before), so that another test's project of the same module
    name is imported afresh, as a new process would."""
    from pipeline import cli
    from pipeline.core.usercode import is_user_file

    unpin(monkeypatch, tmp)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    try:
        return cli.main(argv)
    finally:
        for name in set(sys.modules) - before:
            if is_user_file(getattr(sys.modules[name], "__file__", None)):
                del sys.modules[name]


def unpin(monkeypatch: pytest.MonkeyPatch, tmp: Path | None = None) -> None:
    """No re-exec of the test process and no other test switch; with ``tmp``, a
    private data cache under it."""
    from pipeline.core import _testing

    monkeypatch.setattr(_testing, "SWITCHES", _testing.Switches(no_pin=True))
    if tmp is not None:
        monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp / "cache"))


def copy_source(dest: Path, parts: tuple[str, ...] = SOURCE_PARTS) -> Path:
    """A copy of the checkout's source, data and configs (no runs, no venv)."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in parts:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / part)
    return dest


def build_once(root: Path, name: str, build: Callable[[], Any]) -> Any:
    """``build()``'s JSON-able result, computed by one process per session (the
    pytest-xdist how-to: the first worker builds under a FileLock in ``root``)."""
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            done.write_text(json.dumps(build()), encoding="utf-8")
        return json.loads(done.read_text(encoding="utf-8"))


def f32_bits(a: Any) -> Any:
    """The uint32 bit patterns of ``a`` as float32 (NumPy), for bit-for-bit
    comparisons."""
    import numpy as np

    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def train_here(runs: Path, overrides: list[str], tmp: Path,
               config: str = "configs/digits.toml") -> Path:
    """A run of ``config`` with ``overrides`` trained in this process (unpinned,
    one torch thread, the data cache under ``tmp`` as ``cli_main``'s), for tests
    of what reads finished runs (pipeline.inference, pipeline.export); its run
    directory."""
    import contextlib
    import io

    import torch

    out, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            code = cli_main(["train", str(ROOT / config), *overrides, "--runs-dir", str(runs),
                             "--json", "--quiet"], mp, tmp)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, f"training {config} {overrides} in-process: exit {code}"
    return runs / json.loads(out.getvalue())["run_key"]


CHARLM_SHORT = ["examples/charlm/config.toml", "train.max_steps=20"]


def charlm_run(shared: Path, env: dict[str, str]) -> Path:
    """A short charlm run (20 steps, pinned), trained by `pipeline train` in a
    fresh process once per session (``build_once`` in ``shared``); its run
    directory. For the tests of what reads a language model's run."""
    def build() -> dict[str, Any]:
        runs = shared / "charlm-short"
        p = run_pipeline(["train", *CHARLM_SHORT, "--runs-dir", str(runs), "--json",
                          "--quiet"], env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return {"dir": str(runs / json.loads(p.stdout)["run_key"])}

    return Path(build_once(shared, "charlm-short", build)["dir"])


def forge_record(raw: dict[str, Any]) -> dict[str, Any]:
    """An edited run.json made self-consistent as a forger would make it: its
    run key recomputed from the keyed inputs it now holds, then its digest
    (so that a test reaches the checks past pipeline.record.runs.read_run's)."""
    import hashlib

    from pipeline.core.config import canonical_json
    from pipeline.record.inputs import INPUT_FIELDS
    from pipeline.record.schema import record_digest

    keyed = {name: raw.get(INPUT_FIELDS[name]) for name in raw["key_inputs"]}
    raw["run_key"] = hashlib.sha256(canonical_json(keyed)).hexdigest()
    raw["record_sha256"] = record_digest(raw)
    return raw
