"""The twin's ViT (tests/twin/twin_vit.py, twin_vit_ops.py; docs/exact-spec.md
sections 21, 25-27, 29 on top of 12-16) against float64 references and the
pipeline.

1. each new op against a float64 reference (torch autograd in float64) within
   rounding, and bit for bit against the pipeline's public function where one
   exists (``pipeline.exact.xsum``/``xmean``, ``attention`` with a mask,
   ``smoothed_xent``, ``conv2d``, and the converted ``nn.MultiheadAttention``
   / ``nn.TransformerEncoderLayer`` of ``from_torch``), each with a control
   that a misreading would fail;
2. section 29 (a value with four consumer entries, two of them one multiply)
   against ``LayerNet``, and the whole vit network's shard gradients (masks,
   dropout, label smoothing) against ``LayerNet`` bit for bit and against the
   stock model in float64;
3. full runs: ``examples/vit/config.toml mode=exact train.max_steps=3``
   trained by ``python -m pipeline train`` (a subprocess: a black box) and by
   the twin, weight hash and test accuracy equal; the same with a key padding
   mask (``model.args.masked=3``), and for a variant project whose model
   pools by the mean over tokens (section 21) with the mask; controls: the
   masked run's hash differs from the plain one on both sides, and the twin
   with two dropout sites swapped gives another hash.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from ..support import ROOT as REPO
from ..support import f32_bits as _bits
from ..support import assert_close, train_json
from ..twin import numpy_twin as tw
from ..twin import twin_layers as tl
from ..twin import twin_ops as tops
from ..twin import twin_vit as tv
from ..twin import twin_vit_ops as vo

VIT = REPO / "examples" / "vit"
DIGITS = REPO / "data" / "digits.csv.gz"
F32 = np.float32
F64 = np.float64


def _same_bits(got, want, what=""):
    got = np.asarray(got.detach().numpy() if hasattr(got, "detach") else got, dtype=F32)
    want = np.asarray(want.detach().numpy() if hasattr(want, "detach") else want, dtype=F32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = np.nonzero(_bits(got).reshape(-1) != _bits(want).reshape(-1))[0]
    assert bad.size == 0, f"{what}: {bad.size} differ; first got {got.reshape(-1)[bad[:4]]!r} " \
                          f"want {want.reshape(-1)[bad[:4]]!r}"


def _differs(a, b) -> bool:
    return bool((_bits(a) != _bits(b)).any())




def _t(a, grad=False, dtype=None):
    import torch

    t = torch.tensor(np.asarray(a, dtype=dtype) if dtype else np.asarray(a))
    return t.requires_grad_(grad)


# ------------------------------------------------------------------ 21. sum, mean

def _tree_py(vals: list[float]) -> np.float32:
    """Section 5's tree on a Python list, one f32 add at a time."""
    xs = [F32(v) for v in vals]
    while len(xs) > 1:
        xs = [F32(xs[i] + xs[i + 1]) for i in range(0, len(xs) - 1, 2)] + \
             ([xs[-1]] if len(xs) % 2 else [])
    return xs[0] if xs else F32(0.0)


def test_sum_over_dims_is_one_tree_in_c_order_of_the_reduced_dims():
    """Section 21 (this twin's reading) on a small case by hand: the sum over
    dims (0, 2) of ``x (3, 2, 5)`` is, per kept index ``j``, one tree over the
    15 entries ``x[i, j, l]`` in C order of (i, l); not a tree over l then a
    tree over i (a control that gives other bits here)."""
    rng = np.random.default_rng(210)
    x = (rng.standard_normal((3, 2, 5)) * np.exp(rng.standard_normal((3, 2, 5)) * 4)).astype(F32)
    got = vo.xsum_fwd(x, (0, 2))
    for j in range(2):
        assert _bits(got[j]) == _bits(_tree_py([x[i, j, k] for i in range(3) for k in range(5)]))
    nested = tw.tree_sum(tw.tree_sum(x, 2), 0)
    assert _differs(got, nested), "the control (two nested trees) gave the same bits"
    assert vo.xsum_fwd(x, [-1, 0]).shape == (2,)
    assert vo.xsum_fwd(x, (0, 2), keepdim=True).shape == (1, 2, 1)
    empty = vo.xsum_fwd(np.zeros((0, 3), F32), 0)
    assert empty.shape == (3,) and (_bits(empty) == 0).all()
    assert np.isnan(vo.xmean_fwd(np.zeros((0, 3), F32), 0)).all()
    s0 = vo.xsum_fwd(np.array(F32(-2.5)))
    assert s0.shape == () and s0 == F32(-2.5)


SUM_CASES = [((3, 4, 5), 1, False), ((3, 4, 5), (0, 2), True), ((3, 4, 5), None, False),
             ((3, 4, 5), [], True), ((2, 3, 4, 5), (-1, 1), False), ((17, 8), 0, False),
             ((6, 17, 32), 1, False)]


@pytest.mark.parametrize("shape,dims,keepdim", SUM_CASES)
def test_sum_mean_match_pipeline_bitwise_and_float64(shape, dims, keepdim):
    """``xsum_fwd``/``xmean_fwd`` and their backwards equal
    ``pipeline.exact.xsum``/``xmean`` (forward and autograd backward) bit for
    bit, are within f32 rounding of float64, and equal twin_ops.py's
    independent reading of section 21 bit for bit."""

    import pipeline.exact as E

    rng = np.random.default_rng(211)
    x = rng.standard_normal(shape).astype(F32)
    for fwd, bwd, ref, name in [(vo.xsum_fwd, vo.xsum_bwd, E.xsum, "sum"),
                                (vo.xmean_fwd, vo.xmean_bwd, E.xmean, "mean")]:
        y = fwd(x, dims, keepdim)
        g = rng.standard_normal(y.shape).astype(F32)
        gx = bwd(g, x.shape, dims, keepdim)
        tx = _t(x, True)
        ty = ref(tx, dims, keepdim)
        ty.backward(_t(g))
        _same_bits(y, ty, f"{name} forward")
        _same_bits(gx, tx.grad, f"{name} backward")
        x64 = _t(x, True, F64)
        d = tuple(range(len(shape))) if dims is None or dims == [] else dims
        r64 = (x64.sum(d, keepdim) if name == "sum" else x64.mean(d, keepdim))
        r64.backward(_t(g, dtype=F64))
        assert_close(y, r64, 1e-6, f"{name} vs float64")
        assert_close(gx, x64.grad, 1e-6, f"{name} grad vs float64")
        other = (tops.sum_fwd if name == "sum" else tops.mean_fwd)(x, dims, keepdim)
        _same_bits(y, other, f"{name}: twin_ops.py's reading of section 21")


# ------------------------------------------------------------------ 29. fan-in

def test_fan_in_tree_and_left_out_consumers():
    """Section 29: n >= 3 given gradients are section 5's tree in consumer order
    (four: (g0 + g1) + (g2 + g3), not a left-to-right sum); None is left out
    (so three consumers of which two give none is the one gradient itself,
    the ViT's query/key/value case); two: the f32 sum."""
    rng = np.random.default_rng(290)
    g = [(rng.standard_normal(64) * 10.0 ** rng.integers(-3, 4, 64)).astype(F32)
         for _ in range(4)]
    _same_bits(vo.fan_in(g), (g[0] + g[1]) + (g[2] + g[3]))
    assert _differs(vo.fan_in(g), ((g[0] + g[1]) + g[2]) + g[3])
    _same_bits(vo.fan_in([g[0], None, g[1], g[2]]), (g[0] + g[1]) + g[2])
    _same_bits(vo.fan_in([g[3], None, None]), g[3])
    _same_bits(vo.fan_in([None, g[1], g[2]]), g[1] + g[2])
    assert vo.fan_in([None, None]) is None


FAN_PY = """
import torch
from torch import nn


class Fan(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 6)
        self.lin1 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        h = self.lin0(x)
        return self.head(self.lin1(h) * h + h * h)
"""


def test_value_with_four_consumer_entries_matches_layernet():
    """Section 29 through the pipeline: ``h`` is consumed by ``lin1``, as the
    second factor of ``lin1(h) * h`` and as both factors of ``h * h`` (four
    entries, in this order); ``lin0``'s gradients (which see h's summed
    gradient) equal ``LayerNet.shard_grads``'s bit for bit. Control: summing
    h's four gradients left to right gives other bits."""
    import torch

    import pipeline.exact as E

    ns: dict = {}
    exec(compile(FAN_PY, "fan_model", "exec"), ns)
    net = E.LayerNet(E.from_torch(ns["Fan"]()), 29, "cpu")
    p = {"lin0.weight": tl.uniform_init(29, 0, 0, (6, 6), 6),
         "lin0.bias": tl.uniform_init(29, 0, 1, (6,), 6),
         "lin1.weight": tl.uniform_init(29, 1, 0, (6, 6), 6),
         "lin1.bias": tl.uniform_init(29, 1, 1, (6,), 6),
         "head.weight": tl.uniform_init(29, 2, 0, (10, 6), 6),
         "head.bias": tl.uniform_init(29, 2, 1, (10,), 6)}
    for k, v in net.module.named_parameters():
        _same_bits(p[k], v, f"init {k}")
    rng = np.random.default_rng(291)
    x = (rng.standard_normal((40, 6)) * 3).astype(F32)
    y = rng.integers(0, 10, 40)

    def twin(fold):
        h = tl.linear_fwd(x, p["lin0.weight"], p["lin0.bias"])
        u = tl.linear_fwd(h, p["lin1.weight"], p["lin1.bias"])
        m1, m2 = u * h, h * h
        s = m1 + m2
        z = tl.linear_fwd(s, p["head.weight"], p["head.bias"])
        lse, gz = tw.softmax_xent(z, y, 64)
        gW, gb, gs = tl.linear_bwd(gz, s, p["head.weight"])
        out = {"head.weight": gW, "head.bias": gb}
        gu = gs * h
        out["lin1.weight"], out["lin1.bias"], gh1 = tl.linear_bwd(gu, h, p["lin1.weight"])
        gh = fold([gh1, gs * u, gs * h, gs * h])   # lin1; mul arg 2; mul args 1 and 2
        out["lin0.weight"], out["lin0.bias"], _ = tl.linear_bwd(gh, x, p["lin0.weight"])
        return out, tw.tree_sum(lse, 0)

    got, loss = twin(vo.fan_in)
    want_loss, want = net.shard_grads(_t(x), _t(y), 64, None)
    assert _bits(loss) == _bits(F32(float(want_loss)))
    for k in p:
        _same_bits(got[k], want[k], k)
    other, _ = twin(lambda gs: ((gs[0] + gs[1]) + gs[2]) + gs[3])
    assert _differs(other["lin0.weight"], got["lin0.weight"]), "the control changed nothing"
    assert torch.is_tensor(want["lin0.weight"])


# ------------------------------------------------------------------ 26. attention with a mask

def _attn_inputs(seed, N=2, H=3, T=5, S=6, d=4):
    rng = np.random.default_rng(seed)
    q, k, v = ((rng.standard_normal(s) * 2).astype(F32)
               for s in [(N, H, T, d), (N, H, S, d), (N, H, S, d)])
    return rng, q, k, v, rng.standard_normal((N, H, T, d)).astype(F32)


def _torch_masked_attention(q, k, v, allowed, add=None, keep=None, scale_a=1.0):
    """float64 reference: masked softmax (rows with no allowed key: zeros)."""
    import torch

    s = (q @ k.transpose(-1, -2)) * float(F32(1.0 / math.sqrt(q.shape[-1])))
    if add is not None:
        s = s + add
    al = torch.as_tensor(np.broadcast_to(allowed, s.shape).copy())
    s = s.masked_fill(~al, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if keep is not None:
        p = p * torch.as_tensor(keep, dtype=p.dtype) * scale_a
    return p @ v


@pytest.mark.parametrize("kind", ["bool", "additive", "key_padding"])
def test_masked_attention_matches_pipeline_and_float64(kind):
    """Section 26: a bool mask (one row with no allowed key: +0 output and
    gradients), an additive f32 mask (finite values and -inf), and a key
    padding mask viewed (N, 1, 1, S): forward and backward equal
    ``pipeline.exact.attention(attn_mask=...)`` bit for bit and are within
    f32 rounding of float64; the all-masked row is exactly +0."""
    import pipeline.exact as E

    rng, q, k, v, gy = _attn_inputs(260)
    N, H, T, S = 2, 3, 5, 6
    add = None
    if kind == "bool":
        mask = rng.random((N, 1, T, S)) > 0.4
        mask[1, 0, 3, :] = False                          # a row with no key
        allowed = mask
    elif kind == "additive":
        mask = (rng.standard_normal((T, S)) * 2).astype(F32)
        mask[rng.random((T, S)) > 0.7] = -np.inf
        mask[2, :] = -np.inf                              # a row with no key
        allowed, add = mask != -np.inf, np.where(np.isinf(mask), 0.0, mask)
    else:
        pad = np.zeros((N, S), bool)
        pad[0, -2:] = True
        mask = vo.mha_mask(N, H, T, S, key_padding_mask=pad)
        allowed = mask
    Y, c = vo.sdpa_fwd(q, k, v, mask)
    gq, gk, gv = vo.sdpa_bwd(gy, c)
    tq, tk, tv_ = (_t(a, True) for a in (q, k, v))
    ty = E.attention(tq, tk, tv_, causal=False, attn_mask=_t(mask))
    ty.backward(_t(gy))
    for got, want, what in [(Y, ty, "y"), (gq, tq.grad, "gq"), (gk, tk.grad, "gk"),
                            (gv, tv_.grad, "gv")]:
        _same_bits(got, want, what)
    q6, k6, v6 = (_t(a, True, F64) for a in (q, k, v))
    y6 = _torch_masked_attention(q6, k6, v6, allowed, None if add is None else _t(add, dtype=F64))
    y6.backward(_t(gy, dtype=F64))
    for got, want, what in [(Y, y6, "y"), (gq, q6.grad, "gq"), (gk, k6.grad, "gk"),
                            (gv, v6.grad, "gv")]:
        assert_close(got, want, 5e-6, what)
    if kind != "key_padding":
        row = (1, slice(None), 3) if kind == "bool" else (slice(None), slice(None), 2)
        assert (_bits(Y[row]) == 0).all() and (_bits(gq[row]) == 0).all()


def test_masks_that_allow_all_or_the_past_give_the_unmasked_and_causal_bits():
    """Section 26: a bool mask allowing every pair gives section 14's bits
    without a mask; a lower-triangular one (and its additive 0 / -inf form)
    the causal bits (twin_layers.attention_fwd, the other helper's reading)."""
    _, q, k, v, gy = _attn_inputs(261, T=6, S=6)
    tri = np.tril(np.ones((6, 6), bool))
    for mask, causal in [(np.ones((6, 6), bool), False), (tri, True),
                         (np.where(tri, F32(0.0), F32(-np.inf)).astype(F32), True)]:
        Y, c = vo.sdpa_fwd(q, k, v, mask)
        Y0, c0 = tl.attention_fwd(q, k, v, causal)
        _same_bits(Y, Y0, f"y causal={causal}")
        for a, b in zip(vo.sdpa_bwd(gy, c), tl.attention_bwd(gy, c0)):
            _same_bits(a, b, f"grad causal={causal}")


def test_masked_attention_dropout_matches_pipeline_step_context():
    """The attention's dropout (section 15, one site, F = H * T * S) with a
    key padding mask: the pipeline's ``attention(dropout_p=0.1)`` inside
    ``step_context(seed, step, row0)`` equals the twin with
    ``layer_mask(seed, step, 0, row0, ...)`` bit for bit; control: another
    row0 gives other bits."""
    import pipeline.exact as E

    _, q, k, v, gy = _attn_inputs(262)
    pad = np.zeros((2, 6), bool)
    pad[:, -1] = True
    mask = vo.mha_mask(2, 3, 5, 6, key_padding_mask=pad)
    Tq, scale = tw.dropout_consts(0.1)
    keep = tl.layer_mask(7, 3, 0, 16, (2, 3, 5, 6), Tq)
    Y, c = vo.sdpa_fwd(q, k, v, mask, keep=keep, scale_a=scale)
    grads = vo.sdpa_bwd(gy, c)
    tq, tk, tv_ = (_t(a, True) for a in (q, k, v))
    with E.step_context(7, 3, 16):
        ty = E.attention(tq, tk, tv_, causal=False, dropout_p=0.1, attn_mask=_t(mask))
    ty.backward(_t(gy))
    _same_bits(Y, ty, "y")
    for a, b, what in zip(grads, (tq.grad, tk.grad, tv_.grad), ("gq", "gk", "gv")):
        _same_bits(a, b, what)
    other = tl.layer_mask(7, 3, 0, 17, (2, 3, 5, 6), Tq)
    assert _differs(vo.sdpa_fwd(q, k, v, mask, keep=other, scale_a=scale)[0], Y)


# ------------------------------------------------------------------ 26. MHA, encoder layer

def _mha_params(seed, E_, li=0):
    return {"in_proj_weight": tl.uniform_init(seed, li, 0, (3 * E_, E_), E_),
            "in_proj_bias": np.zeros(3 * E_, F32),
            "out_proj.weight": tl.uniform_init(seed, li + 1, 0, (E_, E_), E_),
            "out_proj.bias": tl.uniform_init(seed, li + 1, 1, (E_,), E_)}


def _load(module, p, dtype=None):
    import torch

    module.load_state_dict({k: torch.tensor(v.astype(dtype) if dtype else v)
                            for k, v in p.items()})
    return module


@pytest.mark.parametrize("masks", ["none", "key_padding", "both_bool", "float_and_bool"])
def test_multihead_self_attention_matches_converted_module_and_float64(masks):
    """Section 26's MultiheadAttention (self-attention: one packed Linear, k =
    3E in its input gradient) with masks (True: masked out): forward and every
    gradient equal ``from_torch(nn.MultiheadAttention(...))`` bit for bit, and
    the stock module in float64 within rounding. E = 96 so the packed Linear's
    input gradient has two blocks (k = 288)."""
    import torch
    from torch import nn

    import pipeline.exact as E

    Em, H, N, T = 96, 4, 3, 7
    p = {k: v for k, v in _mha_params(31, Em).items()}
    p["in_proj_bias"] = tl.uniform_init(31, 5, 1, (3 * Em,), Em)   # not zero: a real test
    rng = np.random.default_rng(263)
    x = rng.standard_normal((N, T, Em)).astype(F32)
    g = rng.standard_normal((N, T, Em)).astype(F32)
    kpm = am = None
    if masks != "none":
        kpm = np.zeros((N, T), bool)
        kpm[1, -3:] = True
    if masks == "both_bool":
        am = np.triu(np.ones((T, T), bool), 2)
    if masks == "float_and_bool":
        am = (rng.standard_normal((N * H, T, T)) * 0.5).astype(F32)
    mask = vo.mha_mask(N, H, T, T, kpm, am)
    out, cache = vo.mha_self_fwd(p, "", x, H, mask)
    grads: dict = {}
    gx = vo.fan_in(list(vo.mha_self_bwd(p, "", g, cache, H, grads)))
    stock = _load(nn.MultiheadAttention(Em, H, batch_first=True), p)
    conv = E.from_torch(stock)
    tx = _t(x, True)
    kw = dict(key_padding_mask=None if kpm is None else _t(kpm),
              attn_mask=None if am is None else _t(am), need_weights=False)
    ty = conv(tx, tx, tx, **kw)[0]
    ty.backward(_t(g))
    _same_bits(out, ty, "out")
    _same_bits(gx, tx.grad, "gx")
    for k, prm in conv.named_parameters():
        _same_bits(grads[k], prm.grad, k)
    s64 = _load(nn.MultiheadAttention(Em, H, batch_first=True).double(), p, F64)
    x6 = _t(x, True, F64)
    am6 = None if am is None else (_t(am) if am.dtype == bool else _t(am, dtype=F64))
    y6 = s64(x6, x6, x6, key_padding_mask=kw["key_padding_mask"], attn_mask=am6,
             need_weights=False)[0]
    y6.backward(_t(g, dtype=F64))
    assert_close(out, y6, 5e-6, "out vs float64")
    assert_close(gx, x6.grad, 5e-6, "gx vs float64")
    for k, prm in s64.named_parameters():
        assert_close(grads[k], prm.grad, 5e-6, f"{k} vs float64")
    assert torch.is_tensor(ty)


def _layer_params(seed, D, F_):
    p = {"self_attn." + k: v for k, v in _mha_params(seed, D).items()}
    p["self_attn.out_proj.bias"] = np.zeros(D, F32)
    p.update({"linear1.weight": tl.uniform_init(seed, 2, 0, (F_, D), D),
              "linear1.bias": tl.uniform_init(seed, 2, 1, (F_,), D),
              "linear2.weight": tl.uniform_init(seed, 3, 0, (D, F_), F_),
              "linear2.bias": tl.uniform_init(seed, 3, 1, (D,), F_),
              "norm1.weight": (1 + tl.uniform_init(seed, 4, 0, (D,), 4)).astype(F32),
              "norm1.bias": tl.uniform_init(seed, 4, 1, (D,), 4),
              "norm2.weight": (1 + tl.uniform_init(seed, 5, 0, (D,), 4)).astype(F32),
              "norm2.bias": tl.uniform_init(seed, 5, 1, (D,), 4)})
    return p


@pytest.mark.parametrize("norm_first,act", [(True, "gelu"), (False, "relu")])
def test_encoder_layer_matches_converted_module_with_dropout(norm_first, act):
    """Section 26's TransformerEncoderLayer (pre-norm GELU, post-norm ReLU),
    dropout 0.1 at its four sites (the attention's, dropout1, dropout,
    dropout2) in training, a key padding mask: forward, input gradient and
    every parameter gradient equal the converted module under
    ``step_context`` and ``Guard`` bit for bit; without dropout, within rounding of the
    stock module in float64. Control: the twin with dropout1 and dropout2
    drawing each other's sites gives other bits."""
    import torch
    from torch import nn

    import pipeline.exact as E

    D, H, F_, N, T = 32, 4, 64, 4, 9
    p = _layer_params(41, D, F_)
    rng = np.random.default_rng(264)
    x = rng.standard_normal((N, T, D)).astype(F32)
    g = rng.standard_normal((N, T, D)).astype(F32)
    kpm = np.zeros((N, T), bool)
    kpm[2:, -2:] = True
    mask = vo.mha_mask(N, H, T, T, key_padding_mask=kpm)

    def twin(q, swap=False):
        drops = vo.Drops(5, 11, 24, q)
        if swap:
            real = drops.next
            order = iter([0, 3, 2, 1])

            def swapped(shape):
                site = next(order)
                drops.site = site
                m = real(shape)
                return m
            drops.next = swapped
        y, c = vo.encoder_layer_fwd(p, "", x, H, drops, mask, norm_first, act)
        grads: dict = {}
        gx = vo.encoder_layer_bwd(p, "", g, c, H, drops.scale, grads, norm_first, act)
        return y, gx, grads, drops

    y, gx, grads, drops = twin(0.1)
    assert drops.site == 4
    stock = _load(nn.TransformerEncoderLayer(D, H, F_, 0.1, activation=act, batch_first=True,
                                             norm_first=norm_first), p)
    conv = E.from_torch(stock).train()
    tx, tk = _t(x, True), _t(kpm)
    with E.step_context(5, 11, 24), E.Guard():   # the guard routes F.gelu / F.relu
        ty = conv(tx, src_key_padding_mask=tk)
    ty.backward(_t(g))
    _same_bits(y, ty, "y")
    _same_bits(gx, tx.grad, "gx")
    for k, prm in conv.named_parameters():
        _same_bits(grads[k], prm.grad, k)
    y_sw, _, _, _ = twin(0.1, swap=True)
    assert _differs(y_sw, y), "the control changed nothing"

    y0, gx0, grads0, _ = twin(0.0)
    s64 = _load(nn.TransformerEncoderLayer(D, H, F_, 0.0, activation=act, batch_first=True,
                                           norm_first=norm_first).double(), p, F64)
    x6 = _t(x, True, F64)
    y6 = s64(x6, src_key_padding_mask=_t(kpm))
    y6.backward(_t(g, dtype=F64))
    assert_close(y0, y6, 1e-5, "y vs float64")
    assert_close(gx0, x6.grad, 1e-5, "gx vs float64")
    for k, prm in s64.named_parameters():
        assert_close(grads0[k], prm.grad, 2e-5, f"{k} vs float64")
    assert torch.is_tensor(ty)


# ------------------------------------------------------------------ 27. label smoothing

@pytest.mark.parametrize("a,ig", [(0.0, None), (0.1, None), (0.5, 3), (1.0, None), (0.1, -100)])
def test_smoothed_xent_matches_pipeline_and_float64(a, ig):
    """Section 27: per-row loss and the gradient of the step's mean equal
    ``pipeline.exact.smoothed_xent`` bit for bit, are within rounding of
    torch's float64 ``cross_entropy(label_smoothing=a, ignore_index=ig)``
    (the gradient of its sum over rows divided by N, as pinned mode's), and
    an ignored row is +0; ``a = 0`` is section 7's ``softmax_xent``."""
    import torch
    import torch.nn.functional as F

    import pipeline.exact as E

    rng = np.random.default_rng(270)
    z = (rng.standard_normal((64, 10)) * 3).astype(F32)
    y = rng.integers(0, 10, 64)
    N = 128
    loss, g = vo.smoothed_xent(z, y, N, a, ig)
    kw = {} if ig is None else {"ignore_index": ig}
    pl, pg = E.smoothed_xent(_t(z), _t(y), N, a, ig)
    _same_bits(loss, pl, "loss")
    _same_bits(g, pg, "grad")
    z6 = _t(z, True, F64)
    ref = F.cross_entropy(z6, _t(y), reduction="none", label_smoothing=a, **kw)
    (ref.sum() / N).backward()
    assert_close(loss, ref, 2e-6, "loss vs float64")
    assert_close(g, z6.grad, 2e-6, "grad vs float64")
    if ig is not None and 0 <= ig < 10:
        rows = y == ig
        assert rows.any() and (_bits(loss[rows]) == 0).all() and (_bits(g[rows]) == 0).all()
    if a == 0.0:
        lse, g0 = tw.softmax_xent(z, y, N)
        _same_bits(loss, lse)
        _same_bits(g, g0)
    assert torch.is_tensor(pl)


# ------------------------------------------------------------------ 25. patch embedding

def test_patch_conv_stride_2_matches_pipeline_and_float64():
    """The patch embedding (section 25: kernel 2, stride 2, no padding) of the
    twin's Conv2d (twin_layers) equals ``pipeline.exact.conv2d`` bit for bit
    (forward, weight, bias and input gradients), within rounding of float64."""
    import torch.nn.functional as F

    import pipeline.exact as E

    rng = np.random.default_rng(250)
    x = rng.random((5, 1, 8, 8)).astype(F32)
    W = tl.uniform_init(3, 0, 0, (32, 1, 2, 2), 4)
    b = tl.uniform_init(3, 0, 1, (32,), 4)
    y, c = tl.conv2d_fwd(x, W, b, 2, 0)
    g = rng.standard_normal(y.shape).astype(F32)
    gW, gb, gx = tl.conv2d_bwd(g, c, W, 2, 0)
    tx, tW, tb = _t(x, True), _t(W, True), _t(b, True)
    ty = E.conv2d(tx, tW, tb, stride=2, padding=0)
    ty.backward(_t(g))
    for got, want, what in [(y, ty, "y"), (gW, tW.grad, "gW"), (gb, tb.grad, "gb"),
                            (gx, tx.grad, "gx")]:
        _same_bits(got, want, what)
    x6, W6, b6 = _t(x, True, F64), _t(W, True, F64), _t(b, True, F64)
    y6 = F.conv2d(x6, W6, b6, stride=2)
    y6.backward(_t(g, dtype=F64))
    for got, want, what in [(y, y6, "y"), (gW, W6.grad, "gW"), (gx, x6.grad, "gx")]:
        assert_close(got, want, 2e-6, what)


# ------------------------------------------------------------------ the whole network

def _stock_module(path=VIT / "model.py"):
    spec = importlib.util.spec_from_file_location("vit_model_for_twin", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _out_proj_zero(a):
    import torch

    D = int(a["d_model"])
    return {f"encoder.layers.{i}.self_attn.out_proj.bias": torch.zeros(D)
            for i in range(int(a["n_layer"]))}


def test_vit_init_numbering_matches_stock_names_and_layernet():
    """Section 16 on the stock model: names and shapes equal its state_dict;
    layer numbers in registration order (patch 0, cls 1, pos 2, layer i's
    self_attn 3 + 6i, out_proj 4 + 6i, linear1, linear2, norm1, norm2; norm
    15, head 16); the in-projection bias and out_proj's bias +0 (torch's
    constants); LayerNet's initialisation (the out_proj biases kept at +0, as
    training keeps a factory's constants) equals the twin's bit for bit."""
    import pipeline.exact as E

    mod = _stock_module()
    model = mod.vit((1, 8, 8), 10)
    a = tv.arch_of({})
    p = tv.init_params(3, a)
    assert {k: v.shape for k, v in p.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert np.array_equal(p["encoder.layers.1.self_attn.in_proj_weight"],
                          tl.uniform_init(3, 9, 0, (96, 32), 32))
    assert np.array_equal(p["encoder.layers.1.linear2.bias"], tl.uniform_init(3, 12, 1, (32,), 64))
    assert np.array_equal(p["head.weight"], tl.uniform_init(3, 16, 0, (10, 32), 32))
    assert np.array_equal(p["cls.weight"], tl.normal_init(3, 1, (1, 32)))
    assert np.array_equal(p["pos.weight"], tl.normal_init(3, 2, (17, 32)))
    assert (_bits(p["encoder.layers.0.self_attn.out_proj.bias"]) == 0).all()
    assert (_bits(p["encoder.layers.0.self_attn.in_proj_bias"]) == 0).all()
    net = E.LayerNet(E.from_torch(model), 3, "cpu", keep=_out_proj_zero(a))
    for k, v in net.module.named_parameters():
        _same_bits(p[k], v, k)


@pytest.mark.parametrize("masked", [0, 3])
def test_vit_shard_gradients_match_layernet_bitwise(masked):
    """One shard of the example's network in training (global rows 16..31 of
    a 64-row step 7: dropout at 9 sites, label smoothing 0.1, N = 64; with
    or without a key padding mask over the last 3 tokens): the twin's loss
    sum and every gradient equal ``LayerNet.shard_grads`` bit for bit."""
    import torch

    import pipeline.exact as E

    mod = _stock_module()
    a = tv.arch_of({"model": {"args": {"masked": masked}}})
    net = E.LayerNet(E.from_torch(mod.vit((1, 8, 8), 10, masked=masked)), 5, "cpu",
                     keep=_out_proj_zero(a),
                     loss=lambda z, t, n: E.smoothed_xent(z, t, n, 0.1))
    X, y = tw.load_data(str(DIGITS))
    x, yy = X[100:116].reshape(-1, 1, 8, 8), y[100:116]
    p = tv.init_params(5, a)
    drops = vo.Drops(5, 7, 16, 0.1)
    grads, loss = tv.shard_grads(p, x, yy, 64, a, drops)
    assert drops.site == 9
    want_loss, want = net.shard_grads(torch.tensor(x), torch.tensor(yy), 64, None, step=7, row0=16)
    assert _bits(loss) == _bits(F32(float(want_loss)))
    assert sorted(want) == sorted(grads)
    for k in sorted(grads):
        _same_bits(grads[k], want[k], k)


def test_vit_gradient_matches_the_stock_model_in_float64():
    """The twin's network (dropout off, key padding mask on, mean pooling in the
    variant that registers no class token, and the example's class token)
    against float64 autograd through examples/vit/model.py with the twin's
    weights: the label-smoothed loss and every gradient within rounding."""
    import torch
    import torch.nn.functional as F

    X, y = tw.load_data(str(DIGITS))
    x, yy = X[:12].reshape(-1, 1, 8, 8), y[:12]
    mod = _stock_module()
    for args in [{"masked": 2}, {"masked": 3, "pool": "mean"}]:
        a = tv.arch_of({"model": {"args": args}})
        p = tv.init_params(9, a)
        grads, loss = tv.shard_grads(p, x, yy, 12, a, vo.Drops(9, 0, 0, 0.0))
        kw = {k: v for k, v in args.items()}
        model = mod.vit((1, 8, 8), 10, dropout=0.0, **kw).double().train()
        model.load_state_dict({k: torch.tensor(v.astype(F64)) for k, v in p.items()})
        logits = model(torch.tensor(x.astype(F64)))
        ref = F.cross_entropy(logits, torch.tensor(yy), label_smoothing=0.1)
        ref.backward()
        assert abs(float(loss) / 12 - float(ref)) < 1e-5, args
        for k, prm in model.named_parameters():
            want = prm.grad if prm.grad is not None else torch.zeros_like(prm)
            assert_close(grads[k], want.numpy(), 3e-5, f"{args} {k}")


# ------------------------------------------------------------------ full runs

def _cfg(overrides, path=VIT / "config.toml"):
    return tw.load_config(str(path), ["mode=exact", *overrides])


def _pipeline(config, overrides, runs, env):
    return train_json(["mode=exact", *overrides], runs, env, config=config, timeout=600)


STEPS = ["train.max_steps=3"]
SHA = tw.file_sha256(str(DIGITS))


def _swap_attention_and_dropout1(monkeypatch):
    real = tl.layer_mask

    def swapped(seed, step, site, row0, shape, T):
        site = {1: 2, 2: 1}.get(site, site)  # layer 0's attention dropout and dropout1
        return real(seed, step, site, row0, shape, T)

    monkeypatch.setattr(tl, "layer_mask", swapped)


@pytest.mark.slow
@pytest.mark.process
def test_vit_hash_matches_pipeline(tmp_path, suite_env, monkeypatch):
    """examples/vit in exact mode, 3 steps (4 shards of 16, dropout 0.1 at 9
    sites, label smoothing, AdamW): the twin's weight hash, test accuracy and
    mean step loss equal the pipeline's. Control: the twin with the
    attention's dropout and dropout1 drawing each other's sites gives
    another hash."""
    params, m = tv.train(_cfg(STEPS), str(DIGITS), SHA)
    want = tw.weights_sha256(params)
    run = _pipeline(VIT / "config.toml", STEPS, tmp_path / "runs", suite_env)
    assert run["weights_sha256"] == want, (run["weights_sha256"], want)
    assert run["metrics"]["test_accuracy"] == m["test_accuracy"]
    # train_loss: the epoch's step losses averaged (not a spec value: rounding aside)
    assert math.isclose(run["metrics"]["train_loss"], sum(m["losses"]) / 3, rel_tol=1e-12)
    _swap_attention_and_dropout1(monkeypatch)
    other, _ = tv.train(_cfg(STEPS), str(DIGITS), SHA)
    assert tw.weights_sha256(other) != want, "the control changed nothing"


@pytest.mark.slow
@pytest.mark.process
def test_vit_key_padding_mask_hash_matches_pipeline(tmp_path, suite_env):
    """The example with ``model.args.masked=3`` (the last 3 patches hidden from
    attention by a bool key padding mask, section 26), 3 steps: the twin's
    weight hash and test accuracy equal the pipeline's, and differ from the
    unmasked run's (control: the mask changes the bits)."""
    over = [*STEPS, "model.args.masked=3"]
    params, m = tv.train(_cfg(over), str(DIGITS), SHA)
    want = tw.weights_sha256(params)
    run = _pipeline(VIT / "config.toml", over, tmp_path / "runs", suite_env)
    assert run["weights_sha256"] == want, (run["weights_sha256"], want)
    assert run["metrics"]["test_accuracy"] == m["test_accuracy"]
    # test_vit_hash_matches_pipeline shows the unmasked run's hash is the
    # same on both sides; here it differs from the masked one
    assert tw.weights_sha256(tv.train(_cfg(STEPS), str(DIGITS), SHA)[0]) != want


@pytest.mark.slow
@pytest.mark.process
def test_mean_pooled_variant_hash_matches_pipeline(tmp_path, suite_env):
    """The example with ``pool = "mean"`` (section 21's mean over the tokens; the
    model then registers no class token) and ``masked = 3``, 3 steps: the twin's
    weight hash and test accuracy equal the pipeline's. Control: the twin with
    another seed gives another hash."""
    config = VIT / "config.toml"
    over = [*STEPS, "model.args.pool=\"mean\"", "model.args.masked=3"]
    params, m = tv.train(_cfg(over, config), str(DIGITS), SHA)
    want = tw.weights_sha256(params)
    run = _pipeline(config, over, tmp_path / "runs", suite_env)
    assert run["weights_sha256"] == want, (run["weights_sha256"], want)
    assert run["metrics"]["test_accuracy"] == m["test_accuracy"]
    other, _ = tv.train(_cfg([*over, "seed=1"], config), str(DIGITS), SHA)
    assert tw.weights_sha256(other) != want
