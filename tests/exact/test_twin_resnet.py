"""examples/resnet in the twin (tests/twin/twin_resnet.py; docs/exact-spec.md
sections 2, 9, 11, 13, 14, 16, 23, 24, 25) against float64 and the pipeline.

1. ops: BatchNorm2d in training (the batch's statistics, the output rounded
   once from f64, the backward, the running statistics moved by momentum or
   the cumulative average) and in evaluation, and the strided convolutions
   of the example (3x3 stride 2 padding 1, 1x1 stride 2 padding 0, no bias),
   each bit for bit against the pipeline's public layers and functions
   (``pipeline.exact.BatchNorm2d``, ``conv2d``: black boxes) and within
   rounding of float64 torch; a misreading of each gives other bits;
2. the network: section 16's initialisation against ``from_torch`` +
   ``init_exact`` of the stock model; one shard's training step (logits, every
   gradient, the running statistics) against the converted model under the
   guard bit for bit, and against float64 autograd of the stock model;
3. a short run: ``examples/resnet/config.toml mode=exact train.max_steps=3``
   by ``python -m pipeline train`` (a subprocess) and by the twin: the same
   weight hash (parameters and BatchNorm buffers) and test accuracy; controls:
   seed 1 gives another hash in both (and the same in both), and the twin
   keeping the last shard's running statistics (not the shards' average) gives
   another hash.

The twin's layer product is ``twin_layers.XMMB``: section 12's ``xmmb``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ..support import ROOT as REPO
from ..support import f32_bits as _bits
from ..support import assert_close, train_json
from ..twin import numpy_twin as tw
from ..twin import twin_layers as tl
from ..twin import twin_resnet as tr

RESNET = REPO / "examples" / "resnet"
F32, F64 = np.float32, np.float64


def _same_bits(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, \
        (what, got.shape, want.shape, got.dtype, want.dtype)
    if got.dtype == F32:
        bad = np.nonzero(_bits(got).reshape(-1) != _bits(want).reshape(-1))[0]
    else:
        bad = np.nonzero(got.reshape(-1) != want.reshape(-1))[0]
    assert bad.size == 0, f"{what}: {bad.size} differ; first got {got.reshape(-1)[bad[:4]]!r} " \
                          f"want {want.reshape(-1)[bad[:4]]!r}"




def _t(a, grad=False):
    import torch

    return torch.from_numpy(np.array(a, copy=True)).requires_grad_(grad)


def _bn_inputs(seed, shape=(16, 8, 4, 4)):
    """Channels with a mean far from 0 and spreads from 2^-3 to 2^3, an affine
    transform, running statistics and a counter as a run leaves them."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (rng.standard_normal(shape) * np.exp2(rng.uniform(-3, 3, (1, C, 1, 1)))
         + rng.uniform(-8, 8, (1, C, 1, 1))).astype(F32)
    w = rng.uniform(0.5, 2, C).astype(F32)
    b = rng.standard_normal(C).astype(F32)
    rm = rng.standard_normal(C).astype(F32)
    rv = rng.uniform(0.5, 3, C).astype(F32)
    g = rng.standard_normal(shape).astype(F32)
    return x, w, b, rm, rv, g


def _pipeline_bn(x, w, b, rm, rv, count, g, momentum, training):
    """(y, gx, gw, gb, rm, rv, count) of pipeline.exact.BatchNorm2d, a black box."""
    import torch

    from pipeline import exact

    layer = exact.BatchNorm2d(x.shape[1], momentum=momentum)
    with torch.no_grad():
        layer.weight.copy_(_t(w))
        layer.bias.copy_(_t(b))
        layer.running_mean.copy_(_t(rm))
        layer.running_var.copy_(_t(rv))
        layer.num_batches_tracked.fill_(count)
    layer.train(training)
    xt = _t(x, True)
    with exact.Guard():
        y = layer(xt)
    gx, gw, gb = torch.autograd.grad(y, [xt, layer.weight, layer.bias], _t(g))
    return (y.detach().numpy(), gx.numpy(), gw.numpy(), gb.numpy(),
            layer.running_mean.numpy().copy(), layer.running_var.numpy().copy(),
            int(layer.num_batches_tracked))


def _f64_bn(x, w, b, rm, rv, g, momentum, training):
    import torch
    import torch.nn.functional as F

    xt = _t(x.astype(F64), True)
    wt, bt = _t(w.astype(F64), True), _t(b.astype(F64), True)
    rmt, rvt = _t(rm.astype(F64)), _t(rv.astype(F64))
    y = F.batch_norm(xt, rmt, rvt, wt, bt, training, momentum, tr.EPS)
    gx, gw, gb = torch.autograd.grad(y, [xt, wt, bt], _t(g.astype(F64)))
    return y.detach().numpy(), gx.numpy(), gw.numpy(), gb.numpy(), rmt.numpy(), rvt.numpy()


# ------------------------------------------------------------------ 24. BatchNorm2d

@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_batchnorm_training_matches_pipeline_and_float64(momentum):
    """Section 24 in training, on 16 examples of 8 channels 4x4 (n = 256 a
    channel), momentum 0.1 and None (f = 1 / count): the output, the gradients
    of x, w and b and the running statistics equal pipeline.exact.BatchNorm2d's
    bit for bit (and the counter), and are within rounding of float64 torch.
    Control: the running variance moved by the biased variance (a misreading)
    gives other bits."""
    x, w, b, rm, rv, g = _bn_inputs(24)
    count = 6
    y, cache, mu, sq = tr.bn_train_fwd(x, w, b)
    gx, gw, gb = tr.bn_train_bwd(g, cache, w)
    nrm, nrv, t = tr.bn_running(rm, rv, count, mu, sq, 256, momentum)
    got = _pipeline_bn(x, w, b, rm, rv, count, g, momentum, True)
    for what, mine, theirs in zip(["y", "gx", "gw", "gb", "running_mean", "running_var"],
                                  [y, gx, gw, gb, nrm, nrv], got[:6]):
        _same_bits(mine, theirs, what)
    assert t == got[6] == count + 1
    f = momentum if momentum is not None else 1.0 / (count + 1)
    ref = _f64_bn(x, w, b, rm, rv, g, f, True)
    for what, mine, want, rel in zip(["y", "gx", "gw", "gb", "running_mean", "running_var"],
                                     [y, gx, gw, gb, nrm, nrv], ref, [1e-6, 1e-5, 1e-5, 1e-6,
                                                                      1e-6, 1e-6]):
        assert_close(mine, want, rel, f"{what} vs float64")
    wrong = ((1.0 - f) * rv.astype(F64) + f * (sq / F32(256)).astype(F64)).astype(F32)
    assert (_bits(wrong) != _bits(got[5])).any(), "the control gave the same bits"


def test_batchnorm_evaluation_matches_pipeline_and_float64():
    """Section 24 in evaluation (the running statistics normalise): output and
    gradients equal pipeline.exact.BatchNorm2d's in eval mode bit for bit, the
    running statistics unchanged, within rounding of float64 torch. Control:
    the output rounded from f32 arithmetic (not f64) gives other bits."""
    x, w, b, rm, rv, g = _bn_inputs(25)
    y, cache = tr.bn_eval_fwd(x, w, b, rm, rv)
    gx, gw, gb = tr.bn_eval_bwd(g, cache, w)
    got = _pipeline_bn(x, w, b, rm, rv, 6, g, 0.1, False)
    for what, mine, theirs in zip(["y", "gx", "gw", "gb", "running_mean", "running_var"],
                                  [y, gx, gw, gb, rm, rv], got[:6]):
        _same_bits(mine, theirs, what)
    assert got[6] == 6
    ref = _f64_bn(x, w, b, rm, rv, g, 0.1, False)
    for what, mine, want in zip(["y", "gx", "gw", "gb"], [y, gx, gw, gb], ref):
        assert_close(mine, want, 1e-5, f"{what} vs float64")
    xh = cache[0]
    f32_y = tr.bn_unrows(xh * w[:, None] + b[:, None], x.shape)
    assert (_bits(f32_y) != _bits(got[0])).any(), "the control gave the same bits"


# ------------------------------------------------------------------ 25. Conv2d

CONVS = [  # (x shape, O, kernel, stride, padding, dilation, groups, bias)
    ((16, 16, 4, 4), 32, 3, 2, 1, 1, 1, False),          # stages.1.conv1
    ((16, 16, 4, 4), 32, 1, 2, 0, 1, 1, False),          # stages.1.shortcut.0
    ((16, 1, 8, 8), 16, 3, 1, 1, 1, 1, False),           # stem.0
    ((3, 6, 9, 7), 4, (3, 2), (2, 1), (1, 2), (2, 1), 2, True),
    ((2, 8, 6, 6), 8, 3, 1, "same", 2, 8, True),          # depthwise, dilated "same"
    ((2, 4, 5, 5), 6, (2, 3), (1, 2), "valid", 1, 2, False),
    ((2, 70, 3, 3), 5, 3, 1, 1, 1, 1, True),             # k = 630: ten blocks of xmmb
]
CONV_IDS = ["3x3 s2 p1", "1x1 s2 p0", "stem", "groups 2 per-dim", "depthwise same d2",
            "valid s(1,2)", "k 630"]


@pytest.mark.parametrize("case", CONVS, ids=CONV_IDS)
def test_conv2d_matches_pipeline_and_float64(case):
    """Section 25's Conv2d in the twin (twin_resnet.conv2d_fwd/bwd: a stride,
    padding and dilation per dim, groups, "same"/"valid"): the output and the
    gradients of x, W and b equal those of pipeline.exact.Conv2d (autograd) bit
    for bit, and are within rounding of float64 torch; with one stride and
    padding and one group they equal section 14's twin_layers.conv2d and
    pipeline.exact.conv2d too (the same bits, as section 25 says). Control:
    the fold with the offsets in the other order (j outer) gives other bits
    for the overlapping windows of the 3x3 with stride 2."""
    import torch
    import torch.nn.functional as F

    from pipeline import exact

    shape, O, k, stride, pad, dil, groups, bias = case
    rng = np.random.default_rng(250 + CONVS.index(case))
    K = (k, k) if isinstance(k, int) else k
    x = rng.standard_normal(shape).astype(F32)
    W = (rng.standard_normal((O, shape[1] // groups) + K) / 3).astype(F32)
    b = rng.standard_normal(O).astype(F32) if bias else None
    y, cache = tr.conv2d_fwd(x, W, b, stride, pad, dil, groups)
    g = rng.standard_normal(y.shape).astype(F32)
    gW, gb, gx = tr.conv2d_bwd(g, cache, W, has_bias=bias)
    layer = exact.Conv2d(shape[1], O, k, stride, pad, bias, dil, groups)
    with torch.no_grad():
        layer.weight.copy_(_t(W))
        if bias:
            layer.bias.copy_(_t(b))
    xt = _t(x, True)
    with exact.Guard():
        yt = layer(xt)
    params = [xt, layer.weight] + ([layer.bias] if bias else [])
    got = torch.autograd.grad(yt, params, _t(g))
    _same_bits(y, yt.detach().numpy(), "y")
    _same_bits(gx, got[0].numpy(), "gx")
    _same_bits(gW, got[1].numpy(), "gW")
    if bias:
        _same_bits(gb, got[2].numpy(), "gb")
    x64, W64 = _t(x.astype(F64), True), _t(W.astype(F64), True)
    b64 = _t(b.astype(F64), True) if bias else None
    y64 = F.conv2d(x64, W64, b64, stride, pad, dil, groups)
    ref = torch.autograd.grad(y64, [x64, W64] + ([b64] if bias else []), _t(g.astype(F64)))
    assert_close(y, y64.detach().numpy(), 1e-6, "y vs float64")
    for what, mine, want in zip(["gx", "gW", "gb"], [gx, gW, gb], ref):
        assert_close(mine, want.numpy(), 1e-6, f"{what} vs float64")
    if isinstance(stride, int) and isinstance(pad, int) and dil == 1 and groups == 1:
        y14, c14 = tl.conv2d_fwd(x, W, b, stride, pad)
        _same_bits(y14, y, "section 14's conv")
        gW14, _, gx14 = tl.conv2d_bwd(g, c14, W, stride, pad, has_bias=bias)
        _same_bits(gW14, gW, "section 14's gW")
        _same_bits(gx14, gx, "section 14's gx")
        xt2, Wt2 = _t(x, True), _t(W, True)
        yf = exact.conv2d(xt2, Wt2, _t(b) if bias else None, stride, pad)
        _same_bits(yf.detach().numpy(), y, "pipeline.exact.conv2d")
        _same_bits(torch.autograd.grad(yf, [xt2], _t(g))[0].numpy(), gx, "conv2d's gx")
    if K == (3, 3) and stride == 2:
        cols, (N, C, H, Wd), _, _, _, _, _, Ho, Wo = cache
        gY = np.ascontiguousarray(g.transpose(0, 2, 3, 1)).reshape(-1, O)
        gcols = tl.XMMB(gY, np.ascontiguousarray(W.reshape(O, -1))).reshape(N, Ho, Wo, C, 3, 3)
        gxpad = np.zeros((N, C, H + 2, Wd + 2), F32)
        for j in range(3):                            # j outer: the misreading
            for i in range(3):
                sl = (slice(None), slice(None), slice(i, i + 2 * (Ho - 1) + 1, 2),
                      slice(j, j + 2 * (Wo - 1) + 1, 2))
                gxpad[sl] = gxpad[sl] + gcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        assert (_bits(gxpad[:, :, 1:-1, 1:-1]) != _bits(got[0].numpy())).any(), \
            "the control gave the same bits"


def test_conv2d_padding_rules():
    """Section 25's padding words: "valid" is (0, 0); "same" is D (K - 1) / 2
    per dim, refused with a stride other than 1 or where D (K - 1) is odd; a
    group count that does not divide the channels is refused."""
    assert tr.conv_padding("valid", (3, 3), (1, 1), (1, 1)) == (0, 0)
    assert tr.conv_padding("same", (3, 5), (1, 1), (2, 1)) == (2, 2)
    assert tr.conv_padding(2, (3, 3), (1, 1), (1, 1)) == (2, 2)
    with pytest.raises(ValueError, match="stride 1"):
        tr.conv_padding("same", (3, 3), (2, 1), (1, 1))
    with pytest.raises(ValueError, match="not symmetric"):
        tr.conv_padding("same", (4, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="groups"):
        tr.conv2d_fwd(np.zeros((1, 6, 4, 4), F32), np.zeros((4, 2, 3, 3), F32), None, groups=4)


# ------------------------------------------------------------------ the network

def _stock_model(widths=(16, 32), blocks=1):
    spec = importlib.util.spec_from_file_location("resnet_model_for_twin", RESNET / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.resnet((1, 8, 8), 10, widths=widths, blocks=blocks)


ARCHS = [((16, 32), 1), ((4, 8, 8), 2)]   # the example's; three stages, identity shortcuts


@pytest.mark.parametrize("widths,blocks", ARCHS, ids=["example", "3 stages x 2 blocks"])
def test_resnet_init_matches_pipeline(widths, blocks):
    """Section 16: the twin's parameters and buffers (names, shapes, dtypes and
    bits) equal those of the stock model converted by from_torch and set by
    init_exact (layer numbers in the pre-order walk: stem conv 0, BatchNorms
    counted without a draw, the shortcut's conv after bn2, fc last). Control:
    init_exact with seed 1 gives other weights."""
    from pipeline import exact

    p, buf = tr.init_state(0, widths, blocks)
    m = exact.init_exact(exact.from_torch(_stock_model(widths, blocks)), 0)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    assert sorted(sd) == sorted({**p, **buf})
    for name, v in {**p, **buf}.items():
        _same_bits(v, sd[name], name)
    m1 = exact.init_exact(exact.from_torch(_stock_model(widths, blocks)), 1)
    assert (_bits(m1.state_dict()["fc.weight"].numpy()) != _bits(p["fc.weight"])).any()
    for name, v in p.items():                      # the draws look like section 3's uniform
        if name.endswith("weight") and v.ndim > 1:
            bound = F32(1.0 / np.sqrt(float(np.prod(v.shape[1:]))))
            assert np.abs(v).max() <= bound and np.abs(v).max() > bound * F32(0.9), name


def _trained_state(seed=3, widths=(16, 32), blocks=1):
    """Parameters and buffers away from their initial values (BatchNorm's w, b
    not 1, 0; running statistics moved), so every branch of the step shows."""
    p, buf = tr.init_state(0, widths, blocks)
    rng = np.random.default_rng(seed)
    for name in p:
        if ".bn" in name or name.startswith("stem.1") or "shortcut.1" in name:
            p[name] = (p[name] + rng.standard_normal(p[name].shape) * 0.2).astype(F32)
    for name in buf:
        if name.endswith("running_mean"):
            buf[name] = (rng.standard_normal(buf[name].shape) * 0.1).astype(F32)
        elif name.endswith("running_var"):
            buf[name] = rng.uniform(0.5, 2, buf[name].shape).astype(F32)
        else:
            buf[name] = np.array(5, np.int64)
    return p, buf


def _shard(seed=7, n=16):
    X, y = tw.load_data(str(REPO / "data" / "digits.csv.gz"))
    idx = np.random.default_rng(seed).choice(len(X), n, replace=False)
    return X[idx].reshape(n, 1, 8, 8), y[idx]


@pytest.mark.parametrize("widths,blocks", ARCHS, ids=["example", "3 stages x 2 blocks"])
def test_resnet_shard_step_matches_pipeline_layers(widths, blocks):
    """One 16-row shard of a training step with every BatchNorm away from its
    initial values: the twin's logits, the gradient of every parameter (from
    section 7's g of a 64-row batch) and the running statistics each BatchNorm
    leaves equal those of the stock model converted by from_torch, under the
    guard with torch autograd, bit for bit; so do the logits in evaluation
    mode (the running statistics normalise). (Control: the next test.)"""
    import torch

    from pipeline import exact

    arch = tr.architecture(widths, blocks)
    p, buf = _trained_state(widths=widths, blocks=blocks)
    x, y = _shard()
    logits, cache, stats = tr.forward(p, buf, x, arch, training=True)
    lse, g = tw.softmax_xent(logits, y, 64)
    grads = tr.backward(p, g, cache, arch)
    m = exact.from_torch(_stock_model(widths, blocks))
    m.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in
                       {**p, **buf}.items()})
    m.train()
    xt = _t(x)
    with exact.Guard():
        out = m(xt)
    assert exact.check_graph(out) == [], exact.check_graph(out)
    _same_bits(logits, out.detach().numpy(), "logits")
    out.backward(_t(g))
    for name, prm in m.named_parameters():
        _same_bits(grads[name], prm.grad.numpy(), f"grad {name}")
    sd = m.state_dict()
    for name, (rm, rv, t) in stats.items():
        _same_bits(rm, sd[f"{name}.running_mean"].numpy(), f"{name}.running_mean")
        _same_bits(rv, sd[f"{name}.running_var"].numpy(), f"{name}.running_var")
        assert t == int(sd[f"{name}.num_batches_tracked"]) == 6
    m.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in
                       {**p, **buf}.items()})
    m.eval()
    with torch.no_grad(), exact.Guard():
        ev = m(xt)
    ev = ev.numpy()
    _same_bits(tr.forward(p, buf, x, arch, training=False)[0], ev, "eval logits")


def test_resnet_shard_step_control(monkeypatch):
    """The control of the shard step: the twin with a block input's second
    gradient (the shortcut's) dropped gives other bits for the stem's weight
    gradient, so the comparison above can fail."""
    arch = tr.architecture()
    p, buf = _trained_state()
    x, y = _shard()
    logits, cache, _ = tr.forward(p, buf, x, arch, training=True)
    _, g = tw.softmax_xent(logits, y, 64)
    want = tr.backward(p, g, cache, arch)["stem.0.weight"]
    monkeypatch.setattr(tr, "fan_in", lambda a, b: a)
    got = tr.backward(p, g, cache, arch)["stem.0.weight"]
    assert (_bits(got) != _bits(want)).any(), "the control gave the same bits"


def test_resnet_shard_step_matches_float64_autograd():
    """The same shard step against float64 autograd of the stock model
    (examples/resnet/model.py in float64, in training mode, with the twin's
    weights and buffers): logits, every gradient and the running statistics
    within rounding (the twin's error is f32 rounding, not a wrong formula)."""
    import torch

    arch = tr.architecture()
    p, buf = _trained_state()
    x, y = _shard()
    logits, cache, stats = tr.forward(p, buf, x, arch, training=True)
    _, g = tw.softmax_xent(logits, y, 64)
    grads = tr.backward(p, g, cache, arch)
    m = _stock_model().double()
    m.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)).to(
        torch.float64 if v.dtype == F32 else torch.int64) for k, v in {**p, **buf}.items()})
    m.train()
    out = m(_t(x.astype(F64)))
    assert_close(logits, out.detach().numpy(), 1e-5, "logits")
    out.backward(_t(g.astype(F64)))
    for name, prm in m.named_parameters():
        assert_close(grads[name], prm.grad.numpy(), 1e-4, f"grad {name}")
    sd = m.state_dict()
    for name, (rm, rv, _) in stats.items():
        assert_close(rm, sd[f"{name}.running_mean"].numpy(), 1e-6, f"{name}.running_mean")
        assert_close(rv, sd[f"{name}.running_var"].numpy(), 1e-6, f"{name}.running_var")


# ------------------------------------------------------------------ a short run

RUN = ["mode=exact", "train.max_steps=3"]


def _pipeline_run(overrides, runs, env):
    return train_json([*RUN, *overrides], runs, env, config=RESNET / "config.toml", timeout=600)


def _twin_run(overrides):
    cfg = tw.load_config(str(RESNET / "config.toml"), [*RUN, *overrides])
    data = REPO / "data" / "digits.csv.gz"
    state, metrics = tr.train(cfg, str(data), tw.file_sha256(str(data)))
    return state, metrics


@pytest.mark.process
@pytest.mark.slow
def test_resnet_hash_matches_pipeline(tmp_path, suite_env, monkeypatch):
    """``examples/resnet/config.toml mode=exact train.max_steps=3`` (4 shards of
    16 rows, BatchNorm statistics per shard, SGD with momentum) trained by
    ``python -m pipeline train`` and by the twin: the same weight hash over
    the parameters and the BatchNorm buffers, and the same test accuracy.
    Controls: seed 1 gives another hash, again the same in both; the twin
    keeping the last shard's running statistics instead of the shards'
    average gives another hash."""
    state, metrics = _twin_run([])
    want = tw.weights_sha256(state)
    assert int(state["stem.1.num_batches_tracked"]) == 3
    run = _pipeline_run([], tmp_path / "runs", suite_env)
    assert sorted(run["weights_layout"]) == sorted(state)
    assert run["weights_sha256"] == want, \
        f"pipeline {run['weights_sha256']} != twin {want}"
    assert run["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    state1, _ = _twin_run(["seed=1"])
    other = tw.weights_sha256(state1)
    assert other != want
    assert _pipeline_run(["seed=1"], tmp_path / "runs1", suite_env)["weights_sha256"] == other
    monkeypatch.setattr(tr, "combine_stats", lambda parts: parts[-1])
    assert tw.weights_sha256(_twin_run([])[0]) != want, "the control changed nothing"
