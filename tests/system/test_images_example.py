"""examples/images end to end: the image folder trains with augmentation to one
hash at --nproc 1 and 2, --threads 1 and --loader-workers 3 (keyed draws); controls: another seed
gives another hash, and the augmentation changes the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..support import ROOT, pipeline_env, run_pipeline

pytestmark = [pytest.mark.process, pytest.mark.slow]

CONFIG = "examples/images/config.toml"
SHORT = ["train.max_steps=6", "data.augment.hflip=true"]


def _hash(tmp_path: Path, name: str, *args: str) -> str:
    p = run_pipeline(["train", CONFIG, *SHORT, *args, "--runs-dir", str(tmp_path / name),
                      "--json", "--quiet"], pipeline_env(tmp_path))
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    try:
        run = json.loads(p.stdout)
    except ValueError:
        pytest.fail(f"{args}: {p.stdout[130900:131300]!r} {p.stderr[-2000:]}")
    assert run["data"]["decoder"]["pillow"] and run["data"]["decoded_sha256"]
    return str(run["weights_sha256"])


def test_images_example_same_hash_at_any_world_size_and_thread_count(tmp_path: Path) -> None:
    """--nproc 1, --nproc 2, --threads 1 and --loader-workers 3 give one hash; seed 1 another; no
    augmentation another (the augmentation is applied)."""
    one = _hash(tmp_path, "a", "--threads", "1")
    assert _hash(tmp_path, "b", "--nproc", "2") == one
    assert _hash(tmp_path, "c") == one
    assert _hash(tmp_path, "f", "--loader-workers", "3") == one
    assert _hash(tmp_path, "d", "seed=1") != one
    assert _hash(tmp_path, "e", "data.augment={}") != one
