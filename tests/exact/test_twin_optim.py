"""The twin's optimisers, clipping and schedule (tests/twin/twin_optim.py,
docs/exact-spec.md section 9) against the spec and the pipeline.

1. self-checks: the spec's check values, float64 (and torch.optim in float64)
   references within rounding, a scalar transcription bit for bit;
2. full runs: ``configs/digits-exact.toml`` with each optimiser option, the
   twin's weight hash and test accuracy against ``python -m pipeline train``'s
   (a subprocess: the pipeline is a black box here); controls: each option
   moves the twin's hash, and a changed rounding in the twin's Adam or AdamW
   weight decay gives another hash than the pipeline's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ..support import ROOT as REPO
from ..support import f32_bits as _bits
from ..support import train_json
from ..support.data import DIGITS as DATA
from ..support.data import SHA as DATA_SHA
from ..twin import numpy_twin as tw
from ..twin import twin_optim as to

CONFIG = REPO / "configs" / "digits-exact.toml"
F32 = np.float32


# ------------------------------------------------------------ 1. self-checks

def test_cospi_and_schedule_match_the_spec_check_values():
    """cospi and the warm-up + cosine table equal section 9.1's hex values
    exactly; cospi is within 2 f64 ulps of cos(pi y) (mpmath, 50 digits) on
    [0, 0.5]; warm-up and the constant schedule are the plain formulas."""
    import mpmath

    assert to.cospi(0.125).hex() == "0x1.d906bcf328d46p-1"
    assert to.cospi(0.3).hex() == "0x1.2cf2304755a5ep-1"
    assert to.cospi(0.5).hex() == "0x0.0p+0"
    want = ["0x1.1111111111111p-5", "0x1.1111111111111p-4", "0x1.999999999999ap-4",
            "0x1.999999999999ap-4", "0x1.8551843eaf1c8p-4", "0x1.4c7d9f437f8bbp-4",
            "0x1.f4be9c700744dp-5", "0x1.3e7496c32bee8p-5", "0x1.346fe9586837ep-6",
            "0x1.448155aea7d32p-8"]
    assert [to.lr_at(t, 0.1, "cosine", 3, 10).hex() for t in range(10)] == want
    for y in np.linspace(0.0, 0.5, 2001)[:-1]:
        with mpmath.workdps(50):
            ref = float(mpmath.cospi(mpmath.mpf(float(y))))
        assert abs(to.cospi(float(y)) - ref) <= 2 * math.ulp(ref) + 1e-17, y
    assert to.cospi(1e-300) == 1.0
    assert [to.lr_at(t, 0.3, "constant", 4, 99) for t in range(6)] == [
        0.3 * (1 / 4), 0.3 * (2 / 4), 0.3 * (3 / 4), 0.3, 0.3, 0.3]
    assert to.lr_at(0, 0.3, "cosine", 0, 7) == 0.3
    with pytest.raises(ValueError):
        to.cospi(0.6)


def _tree_ref(vals):
    vals = list(vals)
    while len(vals) > 1:
        h = len(vals) // 2
        nxt = [F32(vals[2 * i] + vals[2 * i + 1]) for i in range(h)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def _grads(rng, scale=1.0):
    return {"b": (rng.standard_normal(7) * scale).astype(F32),
            "a.weight": (rng.standard_normal((5, 3)) * scale).astype(F32),
            "a.bias": (rng.standard_normal(5) * scale).astype(F32)}


def test_clip_follows_the_spec_and_torch():
    """Clipping: the norm is the tree over every gradient in sorted-name order
    (a scalar reading, bit for bit); the scale is min(c / (norm + 1e-6), 1) in
    f32; the result is within rounding of torch.nn.utils.clip_grad_norm_ in
    float64; below the threshold nothing changes."""
    import torch

    rng = np.random.default_rng(20)
    g = _grads(rng, 3.0)
    flat = [x for k in sorted(g) for x in g[k].reshape(-1)]
    norm = np.sqrt(_tree_ref([F32(x * x) for x in flat]))
    scale = min(F32(2.5) / F32(norm + F32(1e-6)), F32(1.0))
    want = {k: (v * F32(scale)).astype(F32) for k, v in g.items()}
    got = dict(g)
    s = to.clip_grads(got, 2.5)
    assert s == scale < 1
    for k in g:
        assert np.array_equal(_bits(got[k]), _bits(want[k])), k
    ts = [torch.tensor(g[k].astype(np.float64), requires_grad=True) for k in sorted(g)]
    for t, k in zip(ts, sorted(g)):
        t.grad = torch.tensor(g[k].astype(np.float64))
    torch.nn.utils.clip_grad_norm_(ts, 2.5)
    for t, k in zip(ts, sorted(g)):
        assert np.allclose(got[k], t.grad.numpy(), rtol=1e-6, atol=0), k
    small = _grads(rng, 1e-3)
    kept = dict(small)
    assert to.clip_grads(kept, 2.5) == 1.0
    assert all(np.array_equal(_bits(kept[k]), _bits(small[k])) for k in small)


def _scalar_steps(name, th, gs, lrs, o):
    """Section 9.3 / 9.4 element by element with NumPy scalars: a second,
    unvectorised reading of the spec."""
    th = [F32(x) for x in th]
    n = len(th)
    buf, m, v = [None] * n, [F32(0)] * n, [F32(0)] * n
    b1p = b2p = 1.0
    wd, mu = F32(o["weight_decay"]), F32(o.get("momentum", 0.0))
    for t, (g, lr) in enumerate(zip(gs, lrs)):
        if name != "sgd":
            b1p, b2p = b1p * o["beta1"], b2p * o["beta2"]
            step, bc2 = F32(lr / (1.0 - b1p)), F32(1.0 - b2p)
            dec = F32(1.0 - lr * o["weight_decay"])
        for i in range(n):
            gi = F32(g[i])
            if name == "sgd":
                if o["weight_decay"]:
                    gi = F32(gi + F32(th[i] * wd))
                if o["momentum"]:
                    buf[i] = gi if t == 0 else F32(F32(buf[i] * mu) + gi)
                    d = F32(gi + F32(buf[i] * mu)) if o["nesterov"] else buf[i]
                else:
                    d = gi
                th[i] = F32(th[i] - F32(d * F32(lr)))
                continue
            if o["weight_decay"] and name == "adamw":
                th[i] = F32(th[i] * dec)
            elif o["weight_decay"]:
                gi = F32(gi + F32(th[i] * wd))
            m[i] = F32(F32(m[i] * F32(o["beta1"])) + F32(gi * F32(1.0 - o["beta1"])))
            v[i] = F32(F32(v[i] * F32(o["beta2"])) + F32(F32(gi * gi) * F32(1.0 - o["beta2"])))
            den = F32(np.sqrt(F32(v[i] / bc2)) + F32(o["eps"]))
            th[i] = F32(th[i] - F32(F32(m[i] / den) * step))
    return np.array(th, dtype=F32)


OPT_CASES = {  # name -> (optimiser, options)
    "sgd_plain": ("sgd", {"momentum": 0.0, "weight_decay": 0.0, "nesterov": False}),
    "sgd_mom_wd": ("sgd", {"momentum": 0.9, "weight_decay": 0.01, "nesterov": False}),
    "sgd_nesterov_wd": ("sgd", {"momentum": 0.8, "weight_decay": 0.01, "nesterov": True}),
    "adam_wd": ("adam", {"weight_decay": 0.01}),
    "adamw_wd": ("adamw", {"weight_decay": 0.1}),
    "adamw_nowd": ("adamw", {"weight_decay": 0.0}),
}


def _twin_opt(name, o):
    full = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "momentum": 0.0, "nesterov": False,
            **o, "name": name}
    return to.make_optimizer(full), full


def _torch_opt(name, o, params):
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=1.0, momentum=o["momentum"],
                               weight_decay=o["weight_decay"], nesterov=o["nesterov"],
                               foreach=False)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=1.0, weight_decay=o["weight_decay"], foreach=False)


@pytest.mark.parametrize("case", list(OPT_CASES))
def test_optimiser_matches_scalar_reading_and_torch(case):
    """Five updates under a warm-up + cosine schedule: bit for bit equal to an
    element-by-element transcription of section 9; within rounding of
    torch.optim (SGD, Adam, AdamW) run in float64 with the same lr(t)."""
    import torch

    name, o = OPT_CASES[case]
    rng = np.random.default_rng(21)
    th0 = rng.standard_normal(40).astype(F32)
    gs = [rng.standard_normal(40).astype(F32) for _ in range(5)]
    lrs = [to.lr_at(t, 0.05, "cosine", 2, 6) for t in range(5)]
    opt, full = _twin_opt(name, o)
    p = {"w": th0.copy()}
    for g, lr in zip(gs, lrs):
        opt.step(p, {"w": g}, lr)
    assert p["w"].dtype == F32
    want = _scalar_steps(name, th0, gs, lrs, full)
    assert np.array_equal(_bits(p["w"]), _bits(want)), case
    w = torch.tensor(th0.astype(np.float64), requires_grad=True)
    topt = _torch_opt(name, full, [w])
    for g, lr in zip(gs, lrs):
        topt.param_groups[0]["lr"] = lr
        w.grad = torch.tensor(g.astype(np.float64))
        topt.step()
    assert np.allclose(p["w"], w.detach().numpy(), rtol=2e-6, atol=2e-7), case


def test_update_clips_before_weight_decay_and_keeps_the_callers_grads():
    """``update``: clipping scales the step gradient before the optimiser (and
    so before L2 weight decay), lr(t) comes from the schedule, and the caller's
    gradient dict is left as it was."""
    rng = np.random.default_rng(22)
    th0 = rng.standard_normal(30).astype(F32)
    g = (rng.standard_normal(30) * 10).astype(F32)
    oc = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.01,
          "clip_norm": 1.0, "schedule": "cosine", "warmup_steps": 1}
    p = {"w": th0.copy()}
    grads = {"w": g.copy()}
    to.update(to.make_optimizer(oc), p, grads, oc, 1, 4)
    assert np.array_equal(_bits(grads["w"]), _bits(g))
    clipped = {"w": g.copy()}
    to.clip_grads(clipped, 1.0)
    gg = clipped["w"] + th0 * F32(0.01)
    want = th0 - gg * F32(to.lr_at(1, 0.1, "cosine", 1, 4))
    assert np.array_equal(_bits(p["w"]), _bits(want))


# ------------------------------------------------ 2. full runs against the pipeline

PLAIN = ["train.max_steps=20"]
OPTION_RUNS = {  # name -> overrides of configs/digits-exact.toml (sgd, momentum 0.9)
    "sgd_momentum_wd": ["optim.weight_decay=0.0005"],
    "sgd_nesterov": ["optim.nesterov=true"],
    "adam_wd": ["optim.name=adam", "optim.lr=0.001", "optim.weight_decay=0.0005"],
    "adamw_wd": ["optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05"],
    "clip_norm": ["optim.clip_norm=0.5"],
    "cosine_warmup": ["optim.schedule=cosine", "optim.warmup_steps=5"],
}


def _twin_cfg(overrides):
    """The pipeline's config as the twin reads it (model.arch, hidden, dropout
    from the built-in factory's name and [model.args])."""
    cfg = tw.load_config(str(CONFIG), ["mode=exact", *overrides])
    m = cfg["model"]
    a = m.get("args", {})
    m.update(arch=m["factory"].rpartition(":")[2], hidden=list(a.get("hidden", [128])),
             dropout=a.get("dropout", 0.1))
    return cfg


def _twin(overrides):
    params, metrics = tw.train(_twin_cfg(overrides), str(DATA), DATA_SHA)
    return tw.weights_sha256(params), metrics


def _pipeline(overrides, runs, env):
    return train_json(["mode=exact", *overrides], runs, env, config=CONFIG, timeout=300)


class _AdamWDecayInF32(to.Adam):
    """Control: AdamW's decoupled decay as theta - theta * RN32(lr * wd), the same
    value in real arithmetic, another rounding."""

    def step(self, params, grads, lr_t):
        if not self.decoupled:
            return super().step(params, grads, lr_t)
        dec_wd, wd = F32(lr_t * self.weight_decay), self.weight_decay
        self.weight_decay = 0.0
        try:
            for k in params:
                params[k] = params[k] - params[k] * dec_wd
            super().step(params, grads, lr_t)
        finally:
            self.weight_decay = wd


class _AdamL2InF64(to.Adam):
    """Control: Adam's L2 term added in float64 and rounded once (a fused
    multiply-add's rounding) instead of two f32 operations."""

    def step(self, params, grads, lr_t):
        if self.decoupled:
            return super().step(params, grads, lr_t)
        wd = self.weight_decay
        grads = {k: (g.astype(np.float64) + params[k].astype(np.float64) * float(self.wd))
                 .astype(F32) for k, g in grads.items()}
        self.weight_decay = 0.0
        try:
            super().step(params, grads, lr_t)
        finally:
            self.weight_decay = wd


CONTROLS = {"adam_wd": _AdamL2InF64, "adamw_wd": _AdamWDecayInF32}


@pytest.mark.process
@pytest.mark.parametrize("name", list(OPTION_RUNS))
def test_option_run_hash_matches_pipeline(name, tmp_path, suite_env, monkeypatch):
    """20 steps of configs/digits-exact.toml with one optimiser option: the
    twin's weight hash and test accuracy equal the pipeline's. Controls: the
    option changes the twin's hash (it is exercised); for Adam and AdamW with
    weight decay, the twin with the decay rounded another way gives another
    hash than the pipeline's (the comparison can fail on that arithmetic)."""
    overrides = PLAIN + OPTION_RUNS[name]
    want, metrics = _twin(overrides)
    run = _pipeline(overrides, tmp_path / "runs", suite_env)
    assert run["weights_sha256"] == want, (name, run["weights_sha256"], want)
    assert run["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    plain, _ = _twin(PLAIN)
    assert plain != want, f"{name}: the option did not change the twin's hash"
    if name in CONTROLS:
        monkeypatch.setattr(to, "Adam", CONTROLS[name])
        other, _ = _twin(overrides)
        assert other != want, f"{name}: the control variant gave the same hash"
    if name == "clip_norm":
        scales = []
        real = to.clip_grads
        monkeypatch.setattr(to, "clip_grads", lambda g, c: scales.append(real(g, c)) or 1)
        _twin(overrides)
        assert len(scales) == 20 and min(scales) < 1, scales
