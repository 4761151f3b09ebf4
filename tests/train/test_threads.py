"""`pipeline train --threads N`: one hash at 1, 2 and 7 threads for every model
the project ships (the digits MLP, the CNN, the charlm transformer), the
thread count recorded and not keyed. The control: the same runs with stock
intra-op threads (PIPELINE_TEST_INTRAOP_THREADS) give other bits wherever the
model's stock kernels depend on the thread count here, so the suite would see
a thread-dependent kernel come back. Whether they do is measured, not assumed
(``_stock_grads_vary``): MKL under the profile's MKL_CBWR=AVX2,STRICT is
thread-invariant on Intel CPUs (the digits MLP's GEMMs then cannot vary), not
on others, and OpenBLAS at these sizes neither; ATen's LayerNorm backward and
oneDNN's convolution gradients vary everywhere measured."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pipeline.train import threads as threads_mod
from pipeline.train.pinned import PinnedNet, _ShardGenerator
from pipeline.train.threads import ShardRunner

from ..support import ROOT, run_pipeline
from ..support.machines import TRAIN_TIMEOUT_S

MODELS = {
    "mlp": ["configs/digits.toml", "train.max_steps=12"],
    "cnn": ["configs/digits-cnn-exact.toml", "mode=pinned", "train.shards=8",
            "train.max_steps=8"],
    "charlm": ["examples/charlm/config.toml", "train.max_steps=3"],
}


def _train(args: list[str], n: int, runs: Path, env: dict[str, str],
           control: bool = False) -> dict[str, Any]:
    extra = {"PIPELINE_TEST_INTRAOP_THREADS": "1"} if control else {}
    p = run_pipeline(["train", *args, "--threads", str(n),
                      "--runs-dir", str(runs / f"{n}{'c' if control else ''}"),
                      "--json", "--quiet"], {**env, **extra}, timeout=TRAIN_TIMEOUT_S)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


@pytest.mark.process
@pytest.mark.determinism
@pytest.mark.parametrize("model", sorted(MODELS))
def test_one_hash_at_1_2_and_7_threads(model: str, tmp_path: Path,
                                       suite_env: dict[str, str]) -> None:
    args = MODELS[model]
    runs = {n: _train(args, n, tmp_path, suite_env) for n in (1, 2, 7)}
    assert len({r["weights_sha256"] for r in runs.values()}) == 1, \
        {n: r["weights_sha256"] for n, r in runs.items()}
    assert len({r["run_key"] for r in runs.values()}) == 1  # recorded, not keyed
    assert [r["threads"]["requested"] for r in runs.values()] == [1, 2, 7]
    assert runs[2]["threads"]["shard_threads"] == 2
    assert all(r["threads"]["op_threads"] == 1 for r in runs.values())
    # The control: stock kernels on 7 threads give other bits, where this
    # machine's stock kernels for the model depend on the thread count at all.
    stock = _train(args, 7, tmp_path, suite_env, control=True)
    assert stock["threads"]["op_threads"] == 7
    assert stock["test_switches"] == {"intraop_threads": 7}
    if _stock_grads_vary(model, suite_env):
        assert stock["weights_sha256"] != runs[1]["weights_sha256"]
    else:  # nothing to control here: the model's kernels are thread-invariant
        assert model == "mlp", f"{model}'s stock gradients no longer vary with threads"


# One shard's stock forward and backward at 1 and 7 threads under the pinned
# profile: whether any gradient differs in any bit (prints True or False).
_PROBE = """
import sys, torch
from pipeline import models
kind = sys.argv[1]
torch.manual_seed(0)
if kind == "mlp":
    net, x = models.mlp((1, 8, 8), 10, hidden=[128], dropout=0.0), torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
elif kind == "layernorm":
    net = torch.nn.Sequential(torch.nn.LayerNorm(4096), torch.nn.Linear(4096, 10))
    x, y = torch.randn(64, 4096), torch.randint(0, 10, (64,))
else:
    raise SystemExit(f"no probe for {kind}")
grads = []
for n in (1, 7):
    torch.set_num_threads(n)
    loss = torch.nn.functional.cross_entropy(net(x), y, reduction="sum")
    grads.append([g.numpy().tobytes() for g in torch.autograd.grad(loss, list(net.parameters()))])
print(grads[0] != grads[1])
"""


def _stock_grads_vary(kind: str, env: dict[str, str]) -> bool:
    """Whether ``kind``'s stock gradients change with the thread count on this
    machine, under the pinned profile's environment (``mlp``: the digits MLP's
    shard; ``layernorm``: a LayerNorm backward, which splits its sums by thread).
    The CNN and the charlm transformer are taken to vary (oneDNN's convolution
    and LayerNorm gradients: every machine measured)."""
    if kind in ("cnn", "charlm"):
        return True
    from pipeline.core.environment import load_profile

    p = subprocess.run([sys.executable, "-c", _PROBE, kind], cwd=ROOT,
                       env={**env, **load_profile().env}, capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip() == "True"


@pytest.mark.process
def test_the_thread_probe_sees_a_thread_dependent_kernel(suite_env: dict[str, str]) -> None:
    """Control for ``_stock_grads_vary``: a LayerNorm over 4096 features, whose
    stock backward splits its sums by thread, is reported as varying."""
    assert _stock_grads_vary("layernorm", suite_env) is True


@pytest.mark.process
def test_bad_thread_count_is_a_usage_error(tmp_path: Path, suite_env: dict[str, str]) -> None:
    p = run_pipeline(["train", "--threads", "0", "--runs-dir", str(tmp_path)], suite_env,
                     timeout=60)
    assert p.returncode == 2 and "--threads: expected an integer >= 1, found 0" in p.stderr
    assert not any(tmp_path.iterdir())


def _draws() -> list[torch.Tensor]:
    x = torch.ones(8, 33)
    return [torch.rand(5), torch.randn(3, 4), torch.randint(0, 9, (6,)),
            F.dropout(x, 0.3, training=True), torch.bernoulli(torch.full((7,), 0.5)),
            torch.multinomial(torch.ones(10), 4), torch.randperm(9),
            torch.empty(5).uniform_(), torch.empty(4).normal_()]


def test_shard_generator_draws_what_the_seeded_default_generator_draws() -> None:
    """The claim the thread pool rests on, op by op, on another thread."""
    torch.random.default_generator.manual_seed(1234)
    want = _draws()
    got: list[torch.Tensor] = []

    def in_thread() -> None:
        gen = torch.Generator()
        gen.manual_seed(1234)
        with _ShardGenerator(gen):
            got.extend(_draws())

    torch.random.default_generator.manual_seed(99)
    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # The mode is this thread's only: the default generator was not touched.
    seeded = torch.Generator()
    seeded.manual_seed(99)
    assert torch.equal(torch.get_rng_state(), seeded.get_state())


def _net() -> PinnedNet:
    from pipeline.models import mlp

    torch.manual_seed(0)
    return PinnedNet(mlp((16,), 4, hidden=[8], dropout=0.5), torch.device("cpu"), None)


def test_runner_pool_equals_in_order_with_dropout() -> None:
    x, y = torch.rand(32, 16), torch.randint(0, 4, (32,))
    out = {}
    for n in (1, 3):
        net = _net()
        runner = ShardRunner(net, n, 8, pins_threads=True)
        jobs = [lambda s=s, net=net: net.shard_grads(x[4 * s:4 * s + 4], y[4 * s:4 * s + 4],
                                                     32, None, 1000 + s) for s in range(8)]
        out[n] = runner.run(jobs)
        assert runner.record()["shard_threads"] == n
        assert not threads_mod.on_pool_thread()  # the pool's flag is its threads' own
        runner.close()
        assert runner.pool is None
    for (la, ga), (lb, gb) in zip(out[1], out[3]):
        assert torch.equal(la, lb)
        assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_auto_uses_the_pool_only_for_shards_worth_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads_mod, "available_cores", lambda: 4)
    net = _net()
    quick = ShardRunner(net, None, 8, pins_threads=True)
    quick.run([lambda: 0] * 8)
    quick.run([lambda: 0] * 8)
    assert quick.record() == {"requested": "auto", "shard_threads": 1,
                              "op_threads": torch.get_num_threads()}
    quick.close()
    slow = ShardRunner(net, None, 8, pins_threads=True)
    assert slow.run([lambda i=i: (time.sleep(2 * threads_mod.MIN_SHARD_SECONDS), i)[1]
                     for i in range(8)]) == list(range(8))
    assert slow.run([lambda i=i: i for i in range(8)]) == list(range(8))
    assert slow.record()["shard_threads"] == 4
    slow.close()


def test_no_pool_for_buffers_and_exact_mode_sets_op_threads() -> None:
    class WithBuffers:
        threadable, in_threads = False, False

    before = torch.get_num_threads()
    pinned = ShardRunner(WithBuffers(), 4, 8, pins_threads=True)
    assert pinned.record() == {"requested": 4, "shard_threads": 1, "op_threads": before}
    pinned.close()
    exact = ShardRunner(WithBuffers(), 3, 8, pins_threads=False)
    assert torch.get_num_threads() == 3 and exact.record()["op_threads"] == 3
    exact.close()
    assert torch.get_num_threads() == before


def test_a_random_op_without_a_generator_argument_falls_back_to_shards_in_order() -> None:
    """aten.native_dropout takes no generator: on a pool thread it would draw
    from the shared global generator. The step runs again in order, with the
    same results as a runner that never had a pool."""
    def job(s: int) -> Any:
        def run() -> torch.Tensor:
            torch.random.default_generator.manual_seed(s)
            from pipeline.train.pinned import _ShardGenerator
            if threading.current_thread() is threading.main_thread():
                return torch.ops.aten.native_dropout(torch.ones(64), 0.5, True)[0]
            gen = torch.Generator()
            gen.manual_seed(s)
            with _ShardGenerator(gen):
                return torch.ops.aten.native_dropout(torch.ones(64), 0.5, True)[0]
        return run

    net = _net()
    pooled = ShardRunner(net, 2, 8, pins_threads=True)
    got = pooled.run([job(s) for s in range(8)])
    rec = pooled.record()
    pooled.close()
    assert rec["shard_threads"] == 1 and "aten.native_dropout" in rec["fallback"]
    want = [job(s)() for s in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
