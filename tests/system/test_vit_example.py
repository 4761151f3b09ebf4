"""examples/vit in exact mode (spec sections 26-27: nn.TransformerEncoderLayer,
a class token and position embeddings, label smoothing as the project's
loss): one hash over ATen ISA levels (default, AVX2, AVX-512 where the CPU
has it), --threads 1 and 2, --nproc 1, 2 and 4, and native kernels on and
off. Controls: another seed gives another hash; hiding three patches from
attention by a key padding mask (model.args.masked = 3) gives another hash
(the mask is applied)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ..support import pipeline_env, run_pipeline

pytestmark = [pytest.mark.process, pytest.mark.slow]

CONFIG = "examples/vit/config.toml"
SHORT = ["train.max_steps=4", "model.args.n_layer=1"]


def _cpu_has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _train(tmp: Path, name: str, *args: str, **env: str) -> Any:
    p = run_pipeline(["train", CONFIG, *SHORT, *args, "--runs-dir", str(tmp / name), "--json",
                      "--quiet"], pipeline_env(tmp / name, **env))
    assert p.returncode == 0, f"{args} {env}: exit {p.returncode}\n{p.stderr[-3000:]}"
    return json.loads(p.stdout)


def test_vit_exact_is_one_hash_over_isa_threads_world_sizes_and_kernels(tmp_path: Path) -> None:
    one = _train(tmp_path, "ref", "mode=exact", "--threads", "1", ATEN_CPU_CAPABILITY="default")
    h = one["weights_sha256"]
    variants: list[tuple[list[str], dict[str, str]]] = [
        (["--threads", "2"], {"ATEN_CPU_CAPABILITY": "avx2", "PIPELINE_EXACT_NATIVE": "0"}),
        (["--nproc", "4", "--threads", "1"], {}),
    ]
    variants.append((["--nproc", "2"], {"ATEN_CPU_CAPABILITY": "avx512"} if _cpu_has_avx512()
                     else {}))
    for i, (args, env) in enumerate(variants):
        rec = _train(tmp_path, f"v{i}", "mode=exact", *args, **env)
        assert rec["weights_sha256"] == h, (args, env)
    assert _train(tmp_path, "seed", "mode=exact", "seed=1")["weights_sha256"] != h
    assert _train(tmp_path, "mask", "mode=exact", "model.args.masked=3")["weights_sha256"] != h
    assert one["model"]["loss"] == "model:smoothed"
