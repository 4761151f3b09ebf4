"""Exact optimisers, gradient clipping and the schedule in use
(pipeline/exact/optim.py; docs/exact-spec.md section 9), and pinned mode's
torch.optim counterpart (pipeline/pinned.py TorchOptimizer).

Three kinds of evidence:
1. bit for bit against ``Ref``, a NumPy reading of section 9 written here
   step by step from the spec text (not from pipeline/exact), on every
   option; with controls: plausible changes to the weight-decay, Nesterov
   and clipping arithmetic give other bits, so the comparison would catch
   them;
2. within tolerance of torch's own semantics evaluated in float64
   (torch.optim SGD/Adam/AdamW, clip_grad_norm_, a LambdaLR cosine);
3. short exact-mode trainings of configs/digits-exact.toml with each new
   option, bit for bit against the NumPy twin's layers driven by ``Ref``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.core.config import OptimConfig, load_config
from pipeline.core.hashing import weights_sha256
from pipeline.data import dataset, manifest
from pipeline.exact import make_exact_optimizer
from pipeline.exact.flat import flat_views
from pipeline.recipe import train_in_process
from pipeline.train.stock_optim import TorchOptimizer

from ..support import ROOT
from ..support.data import DIGITS, SHA

F32, F64 = np.float32, np.float64


# ------------------------------------------------ section 9, read from the spec
def _ref_tree_sum(x: np.ndarray) -> np.float32:
    """Section 5 on a 1-D f32 array: neighbours added, an odd last carried."""
    while len(x) > 1:
        h = len(x) // 2
        pairs = x[0:2 * h:2] + x[1:2 * h:2]
        x = np.concatenate([pairs, x[-1:]]) if len(x) % 2 else pairs
    return x[0]


_C = [F64(-1.0 if n % 2 else 1.0) * (F64(1.0) / F64(math.factorial(2 * n))) for n in range(10)]
_S = [F64(-1.0 if n % 2 else 1.0) * (F64(1.0) / F64(math.factorial(2 * n + 1))) for n in range(9)]
_PI = F64(3.141592653589793)


def _ref_cospi(y: np.float64) -> np.float64:
    if y > 0.25:
        r = _PI * (F64(0.5) - y)
        z, w = r * r, _S[8]
        for n in range(7, -1, -1):
            w = w * z + _S[n]
        return r * w
    r = _PI * y
    z, w = r * r, _C[9]
    for n in range(8, -1, -1):
        w = w * z + _C[n]
    return w


def _ref_lr(o: dict[str, Any], total: int, t: int) -> np.float64:
    lr, w = F64(o["lr"]), o["warmup_steps"]
    if t < w:
        return lr * (F64(t + 1) / F64(w))
    if o["schedule"] == "constant":
        return lr
    h = _ref_cospi((F64(t - w) / F64(total - w)) * F64(0.5))
    return lr * (h * h)


def _ref_clip(grads: dict[str, np.ndarray], c: float, order: str = "sorted"
              ) -> dict[str, np.ndarray]:
    names = sorted(grads) if order == "sorted" else list(grads)
    flat = np.concatenate([grads[n].reshape(-1) for n in names])
    norm = np.sqrt(_ref_tree_sum(flat * flat))
    scale = min(F32(c) / (norm + F32(1e-6)), F32(1.0))
    return {n: g * scale for n, g in grads.items()}


class Ref:
    """Section 9 on NumPy arrays. ``variant`` != "spec" changes one detail
    (the controls): "l2_f64" (Adam's L2 term in f64), "dec_f32" (AdamW's
    factor in f32), "decay_after" (AdamW's decay after the update),
    "decay_sub" (AdamW as ``theta - theta * (lr * wd)``), "nesterov_old"
    (Nesterov with the buffer before its update), "clip_unsorted" (the norm
    over parameters in insertion order)."""

    def __init__(self, o: dict[str, Any], total: int, variant: str = "spec") -> None:
        self.o, self.total, self.variant, self.t = o, total, variant, 0
        self.buf: dict[str, np.ndarray] = {}
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.b1p = self.b2p = F64(1.0)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        if self.o["clip_norm"] > 0:
            order = "insertion" if self.variant == "clip_unsorted" else "sorted"
            grads = _ref_clip(grads, self.o["clip_norm"], order)
        lr = _ref_lr(self.o, self.total, self.t)
        if self.o["name"] != "sgd":  # once per update, f64 running products
            self.b1p = self.b1p * F64(self.o["beta1"])
            self.b2p = self.b2p * F64(self.o["beta2"])
        for n in params:
            if self.o["name"] == "sgd":
                params[n] = self._sgd(n, params[n], grads[n], lr)
            else:
                params[n] = self._adam(n, params[n], grads[n], lr)
        self.t += 1

    def _sgd(self, n: str, th: np.ndarray, g: np.ndarray, lr: np.float64) -> np.ndarray:
        o = self.o
        mu = F32(o["momentum"])
        if o["weight_decay"] != 0:
            g = g + th * F32(o["weight_decay"])
        d = g
        if o["momentum"] != 0:
            old = self.buf.get(n)
            self.buf[n] = g.copy() if self.t == 0 else self.buf[n] * mu + g
            if o["nesterov"]:
                use = old if self.variant == "nesterov_old" and old is not None else self.buf[n]
                d = g + use * mu
            else:
                d = self.buf[n]
        return th - d * F32(lr)

    def _adam(self, n: str, th: np.ndarray, g: np.ndarray, lr: np.float64) -> np.ndarray:
        o, var = self.o, self.variant
        step = F32(lr / (F64(1.0) - self.b1p))
        bc2 = F32(F64(1.0) - self.b2p)
        wd = o["weight_decay"]
        dec = F32(F64(1.0) - lr * F64(wd))
        if var == "dec_f32":
            dec = F32(1.0) - F32(lr) * F32(wd)
        if wd != 0 and o["name"] == "adam":
            g = (g + th * F32(wd) if var != "l2_f64"
                 else (g.astype(F64) + th.astype(F64) * F64(wd)).astype(F32))
        if wd != 0 and o["name"] == "adamw" and var not in ("decay_after", "decay_sub"):
            th = th * dec
        if wd != 0 and o["name"] == "adamw" and var == "decay_sub":
            th = th - th * (F32(lr) * F32(wd))
        m = self.m.get(n, np.zeros_like(th)) * F32(o["beta1"]) + g * F32(1.0 - o["beta1"])
        v = self.v.get(n, np.zeros_like(th)) * F32(o["beta2"]) + (g * g) * F32(1.0 - o["beta2"])
        self.m[n], self.v[n] = m, v
        th = th - (m / (np.sqrt(v / bc2) + F32(o["eps"]))) * step
        return th * dec if wd != 0 and o["name"] == "adamw" and var == "decay_after" else th


# ------------------------------------------------ 1. optimisers on random tensors
OPTIONS: dict[str, dict[str, Any]] = {
    "sgd_wd": {"momentum": 0.0, "weight_decay": 0.01},
    "sgd_momentum_wd": {"weight_decay": 0.01},
    "sgd_nesterov_wd": {"nesterov": True, "weight_decay": 0.01},
    "sgd_cosine": {"schedule": "cosine"},
    "sgd_nesterov_clip_warmup": {"nesterov": True, "weight_decay": 0.01, "clip_norm": 0.5,
                                 "warmup_steps": 3},
    "adam_wd": {"name": "adam", "lr": 0.01, "weight_decay": 0.01},
    "adamw_wd": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
    # RN32(1 - lr * wd) in f64 is 0.99673; the same in f32 arithmetic 0.99672997.
    "adamw_factor_rounding": {"name": "adamw", "lr": 0.0109, "weight_decay": 0.3},
    "adamw_clip_cosine": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05, "clip_norm": 0.5,
                          "schedule": "cosine", "warmup_steps": 2},
    "adam_clip_not_reached": {"name": "adam", "lr": 0.01, "clip_norm": 1e6},
}
STEPS = 6


def _opt(name: str) -> OptimConfig:
    return OptimConfig(**OPTIONS[name])


def _arrays(seed: int) -> dict[str, np.ndarray]:
    """Three tensors whose insertion order is not their sorted order."""
    g = np.random.default_rng(seed)
    return {"w": g.standard_normal((40, 30)).astype(F32), "b": g.standard_normal(33).astype(F32),
            "a.weight": (g.standard_normal((30, 20)) * 3).astype(F32)}


def _exact_run(o: OptimConfig, flat: bool = False, steps: int = STEPS) -> dict[str, np.ndarray]:
    ps = {k: torch.from_numpy(v) for k, v in _arrays(0).items()}
    if flat:
        ps = flat_views(ps, torch.device("cpu"))
    opt = make_exact_optimizer(o, ps, STEPS)
    assert (opt._flat_theta is not None) is flat  # the update path under test
    for i in range(steps):
        opt.step(_grads(i))
    return {k: v.numpy().copy() for k, v in ps.items()}


def _ref_run(o: OptimConfig, variant: str = "spec") -> dict[str, np.ndarray]:
    ps, ref = _arrays(0), Ref(dataclasses.asdict(o), STEPS, variant)
    for i in range(STEPS):
        ref.step(ps, _arrays(10 + i))
    return ps


def _same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(a[k].dtype == b[k].dtype == F32 and np.array_equal(a[k].view(np.uint32),
                                                                 b[k].view(np.uint32))
               for k in a)


@pytest.mark.parametrize("flat", [False, True], ids=["per_parameter", "flat"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_exact_optimiser_equals_the_spec_reading_bitwise(name: str, flat: bool) -> None:
    """Six updates of the exact optimiser (per-parameter and one-flat-buffer
    paths) give the same bits as the NumPy reading of section 9."""
    assert _same_bits(_exact_run(_opt(name), flat), _ref_run(_opt(name)))


@pytest.mark.parametrize("name,variant", [
    ("adam_wd", "l2_f64"), ("adamw_wd", "decay_after"), ("adamw_wd", "decay_sub"),
    ("adamw_factor_rounding", "dec_f32"),
    ("adamw_clip_cosine", "decay_after"), ("sgd_nesterov_wd", "nesterov_old"),
    ("adamw_clip_cosine", "clip_unsorted"), ("sgd_nesterov_clip_warmup", "clip_unsorted")])
def test_a_changed_rounding_is_caught(name: str, variant: str) -> None:
    """Control for the bitwise test: the reference with one detail of the
    weight-decay, Nesterov or clipping arithmetic changed gives other bits."""
    assert not _same_bits(_exact_run(_opt(name)), _ref_run(_opt(name), variant))


def test_every_option_changes_the_result() -> None:
    """Control: each option makes a difference (else the tests above could
    pass with the option ignored): weight decay, Nesterov, clipping, the
    schedule and AdamW's decoupling each change the bits; a clip norm that is
    never reached does not."""
    runs = {n: _exact_run(_opt(n)) for n in OPTIONS}
    plain = {"sgd": _exact_run(OptimConfig()),
             "adam": _exact_run(OptimConfig(name="adam", lr=0.01))}
    pairs = [("sgd_momentum_wd", plain["sgd"]), ("sgd_nesterov_wd", runs["sgd_momentum_wd"]),
             ("sgd_cosine", plain["sgd"]), ("adam_wd", plain["adam"]),
             ("adamw_wd", _exact_run(OptimConfig(name="adam", lr=0.01, weight_decay=0.05))),
             ("adamw_clip_cosine", runs["adamw_wd"]),
             ("sgd_nesterov_clip_warmup", runs["sgd_nesterov_wd"])]
    for name, other in pairs:
        assert not _same_bits(runs[name], other), name
    assert _same_bits(runs["adam_clip_not_reached"], plain["adam"])


def _factor(o: OptimConfig, total: int) -> Any:
    """LambdaLR's multiplier for torch's semantics, with math.cos."""
    def f(t: int) -> float:
        if t < o.warmup_steps:
            return (t + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (t - o.warmup_steps) / (total - o.warmup_steps)))
    return f


def _torch_run(o: OptimConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """torch.optim (foreach off), clip_grad_norm_ and a LambdaLR in ``dtype``."""
    ps = {k: torch.from_numpy(v).to(dtype) for k, v in _arrays(0).items()}
    plist = list(ps.values())
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            plist, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
            nesterov=o.nesterov, foreach=False)
    else:
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        opt = cls(plist, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                  weight_decay=o.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _factor(o, STEPS))
    for i in range(STEPS):
        for k, g in _arrays(10 + i).items():
            ps[k].grad = torch.from_numpy(g).to(dtype)
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(plist, o.clip_norm, foreach=False)
        opt.step()
        sched.step()
    return ps


@pytest.mark.parametrize("name", list(OPTIONS))
def test_exact_optimiser_is_torch_semantics_within_rounding(name: str) -> None:
    """Six exact updates agree with torch.optim + clip_grad_norm_ + LambdaLR
    evaluated in float64 to 2e-6 of each tensor's largest entry (f32
    rounding, not another formula: a wrong formula is off by far more)."""
    got, want = _exact_run(_opt(name)), _torch_run(_opt(name), torch.float64)
    for k in got:
        w = want[k].numpy()
        assert np.abs(got[k] - w).max() <= 2e-6 * np.abs(w).max(), k


def test_torch_tolerance_separates_formulas() -> None:
    """Control for the tolerance above: Adam's L2 weight decay against torch's
    AdamW (and the reverse), and Nesterov against plain momentum, are far
    outside it."""
    pairs = [("adam_wd", dataclasses.replace(_opt("adam_wd"), name="adamw")),
             ("adamw_wd", dataclasses.replace(_opt("adamw_wd"), name="adam")),
             ("sgd_nesterov_wd", dataclasses.replace(_opt("sgd_nesterov_wd"), nesterov=False))]
    for name, other in pairs:
        got, want = _exact_run(_opt(name)), _torch_run(other, torch.float64)
        assert any(np.abs(got[k] - want[k].numpy()).max() > 2e-6 * np.abs(want[k].numpy()).max()
                   for k in got), name


@pytest.mark.parametrize("name", list(OPTIONS))
def test_pinned_optimiser_is_the_torch_loop(name: str) -> None:
    """Pinned mode's TorchOptimizer gives the bits of the plain torch loop a
    user would write (torch.optim, clip_grad_norm_, LambdaLR) in float32."""
    o = _opt(name)
    ps = {k: torch.from_numpy(v) for k, v in _arrays(0).items()}
    opt = TorchOptimizer(o, ps, STEPS)
    for i in range(STEPS):
        opt.step(_grads(i))
    want = _torch_run(o, torch.float32)
    for k in ps:
        assert torch.equal(ps[k], want[k]), k


def _grads(i: int) -> dict[str, torch.Tensor]:
    """Update i's gradients, fresh (pinned mode clips them in place)."""
    return {k: torch.from_numpy(v) for k, v in _arrays(10 + i).items()}


def _resume(make: Any, scalars_edit: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(straight 6 updates, 3 updates + save through JSON + 3 in a fresh one)."""
    p1 = {k: torch.from_numpy(v) for k, v in _arrays(0).items()}
    p2 = {k: v.clone() for k, v in p1.items()}
    a, b = make(p1), make(p2)
    for i in range(6):
        a.step(_grads(i))
    for i in range(3):
        b.step(_grads(i))
    tensors = {k: v.clone() for k, v in b.state_tensors().items()}
    scalars = {**json.loads(json.dumps(b.state_scalars())), **(scalars_edit or {})}
    c = make(p2)
    c.load_state(tensors, scalars)
    for i in range(3, 6):
        c.step(_grads(i))
    return p1, p2


@pytest.mark.parametrize("mode", ["exact", "pinned"])
@pytest.mark.parametrize("name", ["sgd_nesterov_clip_warmup", "adamw_clip_cosine"])
def test_resume_mid_schedule_is_bitwise(name: str, mode: str) -> None:
    """Saving after 3 updates and resuming gives the bits of 6 straight
    updates (the step count restores the schedule); control: a restored
    step of 0 gives other bits."""
    def make(ps: dict[str, torch.Tensor]) -> Any:
        if mode == "exact":
            return make_exact_optimizer(_opt(name), ps, STEPS)
        return TorchOptimizer(_opt(name), ps, STEPS)
    p1, p2 = _resume(make)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    p1, p2 = _resume(make, {"step": 0})
    assert not all(torch.equal(p1[k], p2[k]) for k in p1)


def test_pinned_load_state_requires_the_step() -> None:
    """A pinned optimiser state without its step count is refused."""
    opt = TorchOptimizer(_opt("adamw_wd"), {k: torch.from_numpy(v)
                                            for k, v in _arrays(0).items()}, STEPS)
    with pytest.raises(ValueError, match="step"):
        opt.load_state(opt.state_tensors(), {})


# ------------------------------------------------ 3. exact-mode training runs
def _load_twin() -> Any:
    """The NumPy twin (tests/twin/, a package: numpy_twin imports its siblings)."""
    from ..twin import numpy_twin

    return numpy_twin


DATA, DATA_SHA = DIGITS, SHA
EXACT = ROOT / "configs" / "digits-exact.toml"
SHORT = ["train.max_steps=30"]  # crosses the first epoch's end (22 steps)
RUNS = {
    "sgd_nesterov_wd": ["optim.nesterov=true", "optim.weight_decay=0.0005"],
    "adam_wd": ["optim.name=adam", "optim.lr=0.002", "optim.weight_decay=0.01"],
    "adamw_wd": ["optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05"],
    "clip_4_shards": ["optim.clip_norm=0.5", "train.shards=4"],
    "cosine_warmup": ["optim.schedule=cosine", "optim.warmup_steps=8"],
}


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dataset.Dataset:
    cache = tmp_path_factory.mktemp("cache")
    return dataset.load(manifest.verify(ROOT / "data-manifest.json", stat_cache_dir=cache),
                        "digits", cache)


# One torch thread, no test switch (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _pipeline_hash(overrides: list[str], ds: dataset.Dataset) -> str:
    cfg = load_config(EXACT, [*SHORT, *overrides])
    return weights_sha256(train_in_process(cfg, ds, run_key="k", ckpt_dir=None,
                                          quiet=True).params)


def _twin_hash(overrides: list[str]) -> str:
    """The run of section 8 on the twin's layers, with ``Ref`` as optimiser."""
    tw, cfg = _load_twin(), load_config(EXACT, [*SHORT, *overrides])
    hidden, q = list(cfg.model.args["hidden"]), float(cfg.model.args["dropout"])
    x, y = tw.load_data(str(DATA))
    _, train_ids = tw.split_ids(len(x), cfg.seed, DATA_SHA, cfg.data.test_fraction)
    params = tw.init_params({"model": {"arch": "mlp", "hidden": hidden}}, cfg.seed)
    bsz, shards = cfg.train.batch_size, cfg.train.shards
    spe = len(train_ids) // bsz
    total = min(spe * cfg.train.epochs, cfg.train.max_steps)
    threshold, scale = tw.dropout_consts(q)
    k_drop, c = tw.key(cfg.seed, tw.DROPOUT), 0
    opt = Ref(dataclasses.asdict(cfg.optim), total)
    for t in range(total):
        epoch, b = divmod(t, spe)
        idx = tw.epoch_order(train_ids, cfg.seed, epoch)[b * bsz:(b + 1) * bsz]
        masks = []
        for width in hidden:
            masks.append((tw.u24(k_drop, c, bsz * width) >= threshold).reshape(bsz, width))
            c += bsz * width
        grads, _ = tw.batch_grads("mlp", params, x[idx], y[idx], masks, scale, shards)
        opt.step(params, grads)
    return str(tw.weights_sha256(params))


@pytest.fixture(scope="module")
def baseline(ds: dataset.Dataset) -> str:
    return _pipeline_hash([], ds)


def test_short_exact_run_equals_the_twin_without_new_options(baseline: str) -> None:
    """The harness itself: the plain short run is the twin-with-Ref's."""
    assert baseline == _twin_hash([])


@pytest.mark.parametrize("name", list(RUNS))
def test_exact_training_with_each_option_equals_the_reference(
        name: str, ds: dataset.Dataset, baseline: str) -> None:
    """30 steps of configs/digits-exact.toml with the option give the weight
    hash of the NumPy twin's layers driven by ``Ref``; and not the plain
    run's (the option took effect)."""
    got = _pipeline_hash(RUNS[name], ds)
    assert got == _twin_hash(RUNS[name])
    assert got != baseline


_PROCESS = r"""
import sys, torch
from pipeline.core.config import OptimConfig
from pipeline.exact import make_exact_optimizer
from pipeline.core.hashing import weights_sha256
torch.set_num_threads(int(sys.argv[1]))
def vals(n, k):  # integers, then one correctly rounded division: the same on every ISA
    i = (torch.arange(n, dtype=torch.int64) * (2654435761 + k)) % 1000003
    return i.to(torch.float32) / 1000003.0 - 0.5
shapes = {"w": (400, 500), "b": (1001,)}
def tensors(k):
    return {name: vals(s[0] * (s[1] if len(s) > 1 else 1), k + j).view(s)
            for j, (name, s) in enumerate(shapes.items())}
out = [torch.backends.cpu.get_cpu_capability()]
for o in (OptimConfig(name="adamw", lr=0.01, weight_decay=0.05, clip_norm=1.0,
                      schedule="cosine", warmup_steps=1),
          OptimConfig(nesterov=True, weight_decay=0.01, clip_norm=1.0, warmup_steps=2)):
    p = tensors(0)
    opt = make_exact_optimizer(o, p, 3)
    for t in range(3):
        opt.step(tensors(10 * (t + 1)))
    out.append(weights_sha256(p))
print(" ".join(out))
"""


@pytest.mark.process
def test_optimisers_give_one_hash_across_threads_and_isa() -> None:
    """AdamW and Nesterov SGD with clipping and a schedule, on 200k-element
    tensors (large enough for torch to split elementwise ops across
    threads), give the same bits at 1 and 2 threads and under ATen's default
    (no SIMD) kernels; control: the two optimisers' hashes differ."""
    import os
    import subprocess

    res = []
    for isa, threads in (("", "1"), ("", "2"), ("default", "1")):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if isa:
            env["ATEN_CPU_CAPABILITY"] = isa
        out = subprocess.run([sys.executable, "-c", _PROCESS, threads], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        res.append(out)
    assert res[2][0] == "DEFAULT" and res[0][0] != "DEFAULT", res
    assert res[0][1:] == res[1][1:] == res[2][1:], res
    assert res[0][1] != res[0][2]
