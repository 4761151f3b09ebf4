"""Running the pipeline as a user would: a fresh process, a chosen environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout (this is tests/support/)
SOURCE_PARTS = ("pipeline", "configs", "data", "data-manifest.json", "requirements.lock",
                "pyproject.toml", "examples")


def pipeline_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The current environment with a private data cache and the given extras."""
    env = dict(os.environ)
    env["PIPELINE_CACHE_DIR"] = str(tmp / "cache")
    env.update(extra)
    return env


def run_pipeline(args: list[str], env: dict[str, str], cwd: Path = ROOT,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def train_json(overrides: list[str], runs: Path, env: dict[str, str],
               cwd: Path = ROOT) -> dict[str, Any]:
    """Train configs/digits.toml with overrides; return run.json (or fail loudly)."""
    p = run_pipeline(["train", "configs/digits.toml", *overrides, "--runs-dir", str(runs),
                      "--json", "--quiet"], env, cwd)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def copy_source(dest: Path) -> Path:
    """A copy of the checkout's source, data and configs (no runs, no venv)."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in SOURCE_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / part)
    return dest


def f32_bits(a: Any) -> Any:
    """The uint32 bit patterns of ``a`` as float32 (NumPy), for bit-for-bit
    comparisons."""
    import numpy as np

    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)
