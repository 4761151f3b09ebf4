"""Spec sections 26-27: attention with bool / additive / broadcast masks and
fully masked rows, nn.MultiheadAttention, nn.TransformerEncoder(Layer), and
label-smoothed cross-entropy: each against the spec written here with NumPy
(bit for bit, forward and backward), against float64 (at or below stock
fp32's error), through the guard and from_torch, with refusals."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.exact import Guard, LayerNet, from_torch, step_context
from pipeline.exact import functional as XF
from pipeline.exact.losses import Xent, recognise_loss, smoothed_xent
from pipeline.exact.ops import softmax_xent

from ..support import f32_bits
from ..twin import numpy_twin as nt
from ..twin import twin_layers as tl

F32, F64 = np.float32, np.float64


def xmmb(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The twin's layer product in the text the pipeline implements (conftest.py)."""
    return tl.XMMB(a, b)


def _rand(shape: tuple[int, ...], seed: int, spread: float = 1.0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.from_numpy((g.standard_normal(shape) * spread).astype(F32))


# ------------------------------------------------------------ the spec in NumPy
def _np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, gy: np.ndarray,
                  allowed: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Section 26 without dropout: (Y, gq, gk, gv)."""
    c = F32(1.0 / math.sqrt(float(q.shape[-1])))
    kt = np.ascontiguousarray(np.swapaxes(k, -1, -2))
    z = (xmmb(q, kt) * c).astype(F32)
    if bias is not None:
        z = (z + bias).astype(F32)
    allowed = np.broadcast_to(allowed, z.shape)
    any_row = allowed.any(-1, keepdims=True)
    mx = np.where(any_row, np.max(np.where(allowed, z, F32(-np.inf)), -1, keepdims=True), F32(0))
    with np.errstate(invalid="ignore", over="ignore"):
        dz = (z - mx).astype(F32)
    e = np.where(allowed, nt.xexp(np.where(allowed, dz, F32(0))), F32(0)).astype(F32)
    s = nt.tree_sum(e, -1)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(s > 0, e / s, F32(0)).astype(F32)
    y = xmmb(p, v)
    gp = xmmb(gy, np.ascontiguousarray(np.swapaxes(v, -1, -2)))
    gv = xmmb(np.ascontiguousarray(np.swapaxes(p, -1, -2)), gy)
    dot = nt.tree_sum(gp * p, -1)[..., None]
    gz = np.where(allowed, ((gp - dot) * p).astype(F32), F32(0)).astype(F32)
    gs = (gz * c).astype(F32)
    return y, xmmb(gs, k), xmmb(np.ascontiguousarray(np.swapaxes(gs, -1, -2)), q), gv


def _np_xent(z: np.ndarray, y: np.ndarray, n: int, a: float,
             ig: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Section 27."""
    rows, c = z.shape
    r = np.arange(rows)
    yy = np.where(y == ig, 0, y) if ig is not None else y
    dz = (z - z.max(1, keepdims=True)).astype(F32)
    e = nt.xexp(dz)
    s = nt.tree_sum(e, 1)
    big_l = nt.xlog(s)
    loss = (big_l - dz[r, yy]).astype(F32)
    if a > 0:
        sm = (big_l - nt.tree_sum(dz, 1) / F32(c)).astype(F32)
        loss = (loss * F32(1.0 - a) + sm * F32(a)).astype(F32)
    p = (e / s[:, None]).astype(F32)
    g = (p - F32(a / c)).astype(F32)
    g[r, yy] = p[r, yy] - F32((1.0 - a) + a / c)
    g = (g / F32(n)).astype(F32)
    if ig is not None:
        loss = np.where(y == ig, F32(0), loss).astype(F32)
        g = np.where((y == ig)[:, None], F32(0), g).astype(F32)
    return loss, g


def _exact_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gy: torch.Tensor,
                **kw: Any) -> list[torch.Tensor]:
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with Guard():
        y = F.scaled_dot_product_attention(qs, ks, vs, **kw)
    y.backward(gy)
    return [y.detach(), qs.grad, ks.grad, vs.grad]


N, H, T, S, E = 2, 3, 5, 7, 8


def _masks() -> dict[str, tuple[Any, np.ndarray, np.ndarray | None]]:
    """name -> (the torch kwargs' mask, allowed, bias) for (N, H, T, S)."""
    g = np.random.default_rng(3)
    full = g.random((N, H, T, S)) < 0.6
    full[0, 1, 2] = False                                  # a row with every key masked
    tri = np.tril(np.ones((T, S), dtype=bool))
    pad = np.ones((N, 1, 1, S), dtype=bool)
    pad[1, ..., 4:] = False
    add = (g.standard_normal((1, 1, T, S)) * 2).astype(F32)
    add[..., 0, 3] = -np.inf
    add[..., 4, :] = -np.inf                               # a fully masked row
    return {"bool_full": (torch.from_numpy(full), full, None),
            "bool_causal_2d": (torch.from_numpy(tri), tri, None),
            "bool_key_padding": (torch.from_numpy(pad), pad, None),
            "additive": (torch.from_numpy(add), add != -np.inf, add)}


@pytest.mark.parametrize("name", ["none", "causal", *_masks()])
def test_sdpa_masks_are_the_spec_bit_for_bit(name: str) -> None:
    q, k, v = _rand((N, H, T, E), 1), _rand((N, H, S, E), 2), _rand((N, H, S, E), 3)
    gy = _rand((N, H, T, E), 4)
    if name == "none":
        kw, allowed, bias = {}, np.ones((T, S), dtype=bool), None
    elif name == "causal":
        kw, allowed, bias = {"is_causal": True}, np.tril(np.ones((T, S), dtype=bool)), None
    else:
        mask, allowed, bias = _masks()[name]
        kw = {"attn_mask": mask}
    got = _exact_sdpa(q, k, v, gy, **kw)
    want = _np_attention(q.numpy(), k.numpy(), v.numpy(), gy.numpy(), allowed, bias)
    for g_, w in zip(got, want):
        assert np.array_equal(f32_bits(g_), w.view(np.uint32)), name


def test_masks_that_allow_every_pair_give_the_unmasked_bits() -> None:
    """An all-True bool mask is section 14's no-mask attention; a bool
    lower-triangular mask and an additive 0/-inf one give the causal bits."""
    q, k, v, gy = _rand((N, H, T, E), 1), _rand((N, H, T, E), 2), _rand((N, H, T, E), 3), \
        _rand((N, H, T, E), 4)
    plain = _exact_sdpa(q, k, v, gy)
    causal = _exact_sdpa(q, k, v, gy, is_causal=True)
    tri = torch.ones(T, T, dtype=torch.bool).tril()
    add = torch.zeros(T, T).masked_fill(~tri, -math.inf)
    for got, want in ((_exact_sdpa(q, k, v, gy, attn_mask=torch.ones(T, T, dtype=torch.bool)),
                       plain), (_exact_sdpa(q, k, v, gy, attn_mask=tri), causal),
                      (_exact_sdpa(q, k, v, gy, attn_mask=add), causal)):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(plain[0], causal[0])  # control


def test_fully_masked_rows_are_zero_as_torch_gives() -> None:
    q, k, v, gy = _rand((1, 1, 3, 4), 1), _rand((1, 1, 5, 4), 2), _rand((1, 1, 5, 4), 3), \
        _rand((1, 1, 3, 4), 4)
    m = torch.ones(3, 5, dtype=torch.bool)
    m[1] = False
    got = _exact_sdpa(q, k, v, gy, attn_mask=m)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m)
    ref.backward(gy)
    assert bool((ref[0, 0, 1] == 0).all()) and bool((got[0][0, 0, 1] == 0).all())
    assert bool((got[1][0, 0, 1] == 0).all()) and bool((qs.grad[0, 0, 1] == 0).all())
    assert torch.allclose(got[0], ref.detach(), atol=1e-5)


def _normwise(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", ["none", "causal", *_masks()])
def test_sdpa_masks_match_float64_as_well_as_fp32(name: str) -> None:
    """Normwise error vs float64 (forward and the three gradients): at most
    1.5x stock fp32's (plus a floor of 4 ulps' worth, 5e-7)."""
    n, h, t, s, e = 2, 3, 24, 40, 32
    q, k, v, gy = (_rand(sh, i, 2.0) for i, sh in enumerate(
        ((n, h, t, e), (n, h, s, e), (n, h, s, e), (n, h, t, e))))
    if name == "none":
        kw: dict[str, Any] = {}
    elif name == "causal":
        q, k, v = q, k[:, :, :t], v[:, :, :t]
        kw = {"is_causal": True}
    else:
        g = np.random.default_rng(5)
        if name == "additive":
            m = torch.from_numpy((g.standard_normal((1, 1, t, s)) * 2).astype(F32))
            m[..., ::3, 5] = -math.inf
        elif name == "bool_key_padding":
            m = torch.ones(n, 1, 1, s, dtype=torch.bool)
            m[1, ..., 30:] = False
        else:
            m = torch.from_numpy(g.random((t, s) if "2d" in name else (n, h, t, s)) < 0.7)
            m[..., 0] = True
        kw = {"attn_mask": m}
    got = _exact_sdpa(q, k, v, gy, **kw)
    ref = _exact_ref(q, k, v, gy, torch.float64, **kw)
    fp32 = _exact_ref(q, k, v, gy, torch.float32, **kw)
    for a, b, r in zip(got, fp32, ref):
        assert _normwise(a, r) <= max(1.5 * _normwise(b, r), 5e-7), name


def _exact_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gy: torch.Tensor,
               dtype: torch.dtype, **kw: Any) -> list[torch.Tensor]:
    qs, ks, vs = (t.to(dtype).requires_grad_() for t in (q, k, v))
    if "attn_mask" in kw and kw["attn_mask"].dtype != torch.bool:
        kw = {**kw, "attn_mask": kw["attn_mask"].to(dtype)}
    y = F.scaled_dot_product_attention(qs, ks, vs, **kw)
    y.backward(gy.to(dtype))
    return [y.detach().double(), qs.grad.double(), ks.grad.double(), vs.grad.double()]


def test_mask_refusals() -> None:
    q = _rand((1, 1, 3, 4), 1)
    cases = [({"attn_mask": torch.full((3, 3), math.inf)}, r"\+inf or NaN"),
             ({"attn_mask": torch.full((3, 3), math.nan)}, r"\+inf or NaN"),
             ({"attn_mask": torch.zeros(3, 3, dtype=torch.int32)}, "dtype"),
             ({"attn_mask": torch.zeros(3, 3, requires_grad=True)}, "gradient"),
             ({"attn_mask": torch.ones(3, 3, dtype=torch.bool), "is_causal": True}, "not both"),
             ({"attn_mask": torch.ones(4, 3, dtype=torch.bool)}, "broadcast")]
    for kw, why in cases:
        with pytest.raises(ValueError, match=why), Guard():
            F.scaled_dot_product_attention(q, q, q, **kw)


# ------------------------------------------------------------ MultiheadAttention
def _mha_pair(seed: int, **kw: Any) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(**kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero biases too
    return m, from_torch(m)


MHA_CASES = [
    dict(embed_dim=16, num_heads=4, batch_first=True),
    dict(embed_dim=16, num_heads=2, batch_first=False, bias=False),
    dict(embed_dim=16, num_heads=4, batch_first=True, kdim=12, vdim=10),
]


@pytest.mark.parametrize("case", range(len(MHA_CASES)))
@pytest.mark.parametrize("masks", ["none", "bool", "float", "mixed"])
@pytest.mark.parametrize("weights", [False, True])
def test_multihead_attention_matches_torch(case: int, masks: str, weights: bool) -> None:
    """Outputs (and averaged / per-head weights) within 2e-6 of torch's float64
    module; the parameters' and inputs' gradients too (relative)."""
    kw = MHA_CASES[case]
    ref, ex = _mha_pair(case, **kw)
    ref = ref.double()
    bf, e = kw["batch_first"], kw["embed_dim"]
    n, t, s = 3, 5, 6
    shape = (lambda L, d: (n, L, d)) if bf else (lambda L, d: (L, n, d))
    self_attn = "kdim" not in kw
    x = _rand(shape(t, e), 1)
    if self_attn:
        q = k = v = x.requires_grad_()
        s = t
    else:
        q, k, v = x, _rand(shape(s, kw["kdim"]), 2), _rand(shape(s, kw["vdim"]), 3)
    margs: dict[str, Any] = {}
    if masks != "none":
        kpm = torch.zeros(n, s, dtype=torch.bool)
        kpm[1, s - 2:] = True
        am = torch.zeros(t, s, dtype=torch.bool)
        am[0, 1] = True
        if masks == "float":
            kpm = torch.zeros(n, s).masked_fill(kpm, -math.inf)
            am = torch.from_numpy(np.random.default_rng(2).standard_normal((n * kw["num_heads"],
                                                                              t, s)).astype(F32))
        if masks == "mixed":
            am = torch.zeros(t, s).masked_fill(am, -math.inf) + 0.25
        margs = {"key_padding_mask": kpm, "attn_mask": am}
    for avg in (True, False) if weights else (True,):
        with Guard():
            y, w = ex(q, k, v, need_weights=weights, average_attn_weights=avg, **margs)
        ry, rw = ref(*(z.detach().double().requires_grad_() for z in (q, k, v)),
                     need_weights=weights, average_attn_weights=avg,
                     **{a: (m if m.dtype == torch.bool else m.double()) for a, m in margs.items()})
        assert torch.allclose(y.double(), ry, atol=2e-6, rtol=1e-5)
        assert (w is None) == (not weights)
        if weights:
            assert w.shape == rw.shape and torch.allclose(w.double(), rw, atol=2e-6)
    loss = y.square().sum() + (w.sum() * 0.5 if weights else 0)
    loss.backward()
    rloss = ry.square().sum() + (rw.sum() * 0.5 if weights else 0)
    rloss.backward()
    for (name, p), (_, rp) in zip(ex.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.grad.double(), rp.grad, atol=1e-5, rtol=1e-4), name


def test_multihead_attention_is_the_spec_bit_for_bit() -> None:
    """Packed self-attention with a bool key padding mask (need_weights
    False): the output and the gradients of the input and of every
    parameter equal section 26 written with NumPy (Linear: section 14)."""
    torch.manual_seed(0)
    e, h, n, t = 12, 3, 2, 5
    ref, ex = _mha_pair(0, embed_dim=e, num_heads=h, batch_first=True)
    x = _rand((n, t, e), 1).requires_grad_()
    kpm = torch.zeros(n, t, dtype=torch.bool)
    kpm[1, 3:] = True
    gy = _rand((n, t, e), 2)
    with Guard():
        y, _ = ex(x, x, x, key_padding_mask=kpm, need_weights=False)
    y.backward(gy)
    W, b = ex.in_proj_weight.detach().numpy(), ex.in_proj_bias.detach().numpy()
    Wo, bo = ex.out_proj.weight.detach().numpy(), ex.out_proj.bias.detach().numpy()
    X = x.detach().numpy().reshape(n * t, e)
    qkv = (xmmb(X, np.ascontiguousarray(W.T)) + b).astype(F32)
    d = e // h
    heads = [np.ascontiguousarray(qkv[:, i * e:(i + 1) * e].reshape(n, t, h, d)
                                  .transpose(0, 2, 1, 3)) for i in range(3)]
    allowed = ~kpm.numpy().reshape(n, 1, 1, t)
    # the forward output, then the backward from gy
    y_att = _np_attention(heads[0], heads[1], heads[2], np.zeros((n, h, t, d), F32), allowed,
                          None)[0]
    Yc = np.ascontiguousarray(y_att.transpose(0, 2, 1, 3)).reshape(n * t, e)
    out = (xmmb(Yc, np.ascontiguousarray(Wo.T)) + bo).astype(F32)
    assert np.array_equal(f32_bits(y.detach()).reshape(-1), out.view(np.uint32).reshape(-1))
    G = gy.numpy().reshape(n * t, e)
    gWo = xmmb(np.ascontiguousarray(G.T), Yc)
    gbo = nt.tree_sum(G, 0)
    gYc = xmmb(G, Wo).reshape(n, t, h, d).transpose(0, 2, 1, 3)
    _, gq, gk, gv = _np_attention(heads[0], heads[1], heads[2], np.ascontiguousarray(gYc),
                                  allowed, None)
    gqkv = np.concatenate([np.ascontiguousarray(g_.transpose(0, 2, 1, 3)).reshape(n * t, e)
                           for g_ in (gq, gk, gv)], axis=1)
    gW = xmmb(np.ascontiguousarray(gqkv.T), X)
    gb = nt.tree_sum(gqkv, 0)
    gX = xmmb(gqkv, W)
    for got, want in ((ex.out_proj.weight.grad, gWo), (ex.out_proj.bias.grad, gbo),
                      (ex.in_proj_weight.grad, gW), (ex.in_proj_bias.grad, gb),
                      (x.grad.reshape(n * t, e), gX)):
        assert np.array_equal(f32_bits(got), want.astype(F32).view(np.uint32))


def test_multihead_attention_refusals() -> None:
    for kw in (dict(add_bias_kv=True), dict(add_zero_attn=True)):
        with pytest.raises(ConfigError, match="add_bias_kv and add_zero_attn"):
            from_torch(nn.MultiheadAttention(8, 2, **kw))
    _, ex = _mha_pair(0, embed_dim=8, num_heads=2, batch_first=True)
    x = _rand((2, 3, 8), 1)
    kpm = torch.tensor([[False, False, False], [True, True, True]])
    with Guard():
        y, _ = ex(x, x, x, key_padding_mask=kpm, need_weights=False)  # zeros, as torch
    assert bool((y.detach()[1] == ex.out_proj.bias.detach()).all())
    with Guard():
        with pytest.raises(ValueError, match="every key is masked"):
            ex(x, x, x, key_padding_mask=kpm, need_weights=True)
        with pytest.raises(ValueError, match="is_causal needs attn_mask"):
            ex(x, x, x, is_causal=True)
        with pytest.raises(ValueError, match="key_padding_mask of shape"):
            ex(x, x, x, key_padding_mask=kpm.t())
    with pytest.raises(ConfigError, match="TransformerDecoderLayer"):
        from_torch(nn.TransformerDecoderLayer(8, 2))


# ------------------------------------------------------------ TransformerEncoder
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_converts_and_matches_torch(norm_first: bool, batch_first: bool,
                                                        activation: str) -> None:
    torch.manual_seed(1)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(
        16, 4, 32, 0.1, activation, batch_first=batch_first, norm_first=norm_first), 2,
        norm=nn.LayerNorm(16), enable_nested_tensor=False)
    ex = from_torch(enc)
    assert [k for k, _ in ex.named_parameters()] == [k for k, _ in enc.named_parameters()]
    n, t = 3, 6
    x = _rand((n, t, 16) if batch_first else (t, n, 16), 1)
    kpm = torch.zeros(n, t, dtype=torch.bool)
    kpm[2, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(t)
    enc.eval(), ex.eval()
    for kw in ({}, {"src_key_padding_mask": kpm}, {"mask": causal, "is_causal": True}):
        with Guard():
            y = ex(x, **kw)
        ref = enc.double()(x.double(), **{a: (m.double() if m.is_floating_point() else m)
                                          if isinstance(m, torch.Tensor) else m
                                          for a, m in kw.items()})
        enc.float()
        assert torch.allclose(y.double(), ref, atol=3e-6), kw
    # trains: the guard's check (one forward in training, one in evaluation) passes
    net = LayerNet(ex, 0, "cpu", x[:2] if batch_first else x[:, :2])
    assert net.params


def test_fused_fast_paths_never_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's encoder layer takes a native fused kernel in evaluation without
    gradients (its fast path); the converted encoder never calls it, nor
    torch's native MHA."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2)
    ex = from_torch(enc).eval()
    x = _rand((3, 6, 16), 1)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[0, 5] = True
    called = []
    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _r=real, _n=name, **k: (
            called.append(_n), _r(*a, **k))[1])
    enc.eval()
    with torch.no_grad():
        enc(x, src_key_padding_mask=kpm)
        assert called, "the control: stock torch takes its fast path here"
        called.clear()
        with Guard():
            y = ex(x, src_key_padding_mask=kpm)
    assert not called and bool((y[0, 5] != 0).any())  # padded position computed


# ------------------------------------------------------------ label smoothing
@pytest.mark.parametrize("a", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("ig", [None, 3])
def test_label_smoothing_is_the_spec_bit_for_bit(a: float, ig: int | None) -> None:
    z = _rand((37, 11), 1, 4.0)
    y = torch.from_numpy(np.random.default_rng(2).integers(0, 11, 37))
    loss, g = smoothed_xent(z, y, 64, a, ig)
    want_l, want_g = _np_xent(z.numpy(), y.numpy(), 64, a, ig)
    assert np.array_equal(f32_bits(loss), want_l.view(np.uint32))
    assert np.array_equal(f32_bits(g), want_g.view(np.uint32))
    if a == 0.0 and ig is None:  # section 7's bits
        l7, g7 = softmax_xent(z, y, 64)
        assert torch.equal(loss, l7) and torch.equal(g, g7)


@pytest.mark.parametrize("a", [0.1, 0.3])
def test_label_smoothing_matches_float64_as_well_as_fp32(a: float) -> None:
    z = _rand((256, 50), 1, 5.0)
    y = torch.from_numpy(np.random.default_rng(2).integers(0, 50, 256))
    loss, g = smoothed_xent(z, y, 256, a, None)
    errs = []
    for dtype in (torch.float64, torch.float32):
        zz = z.to(dtype).requires_grad_()
        ref = F.cross_entropy(zz, y, label_smoothing=a, reduction="none")
        (ref.sum() / 256).backward()
        errs.append((ref.detach().double(), zz.grad.double()))
    (rl, rg), (fl, fg) = errs
    assert _normwise(loss, rl) <= max(1.5 * float((fl - rl).norm() / rl.norm()), 1e-7)
    assert _normwise(g, rg) <= max(1.5 * float((fg - rg).norm() / rg.norm()), 1e-7)


def test_project_losses_are_recognised_or_refused() -> None:
    assert recognise_loss(nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1), (2, 10),
                          "m:f") == Xent(0.1, None)
    assert recognise_loss(lambda z, y: F.cross_entropy(
        z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="none", ignore_index=0),
        (2, 5, 10), "m:f") == Xent(0.0, 0)
    assert recognise_loss(nn.CrossEntropyLoss(reduction="sum"), (2, 10), "m:f") == Xent()
    bad = [(nn.CrossEntropyLoss(label_smoothing=0.1), "reduction must be 'none'"),
           (nn.CrossEntropyLoss(weight=torch.ones(10), reduction="none"), "weight"),
           (lambda z, y: F.cross_entropy(z, y, reduction="none") * 2, "Tensor.mul"),
           (lambda z, y: F.cross_entropy(z.flip(0), y, reduction="none"), "flip"),
           (lambda z, y: F.cross_entropy(z[[1, 0]], y, reduction="none"), "__getitem__"),
           (lambda z, y: F.cross_entropy(z[1:], y[1:], reduction="none"), "logits' rows"),
           (lambda z, y: F.mse_loss(z, z), "mse_loss"),
           (lambda z, y: 1 / 0, "ZeroDivisionError")]
    for fn, why in bad:
        with pytest.raises(ConfigError, match=why):
            recognise_loss(fn, (2, 10), "m:f")


def test_ops_do_not_depend_on_the_thread_count() -> None:
    """Masked attention, MHA with weights and the smoothed loss at 1 and 3
    threads: the same bits."""
    q, k, v, gy = (_rand(sh, i) for i, sh in enumerate(
        ((4, 4, 64, 16), (4, 4, 80, 16), (4, 4, 80, 16), (4, 4, 64, 16))))
    m = torch.from_numpy(np.random.default_rng(1).random((4, 1, 64, 80)) < 0.8)
    z = _rand((512, 30), 3, 3.0)
    y = torch.from_numpy(np.random.default_rng(2).integers(0, 30, 512))
    old = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            with step_context(0, 0, 0):
                out.append([*_exact_sdpa(q, k, v, gy, attn_mask=m),
                            *smoothed_xent(z, y, 512, 0.1, 2)])
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_multihead_attention_dropout_is_the_step_contexts_mask() -> None:
    """In training, MultiheadAttention drops attention weights with section
    15's mask: the same in two runs of one step context, another in another
    step; kept weights are the evaluation weights times RN32(1 / (1 - q))."""
    _, ex = _mha_pair(0, embed_dim=16, num_heads=4, dropout=0.5, batch_first=True)
    x = _rand((3, 6, 16), 1)
    ex.eval()
    with Guard():
        _, w0 = ex(x, x, x, need_weights=True, average_attn_weights=False)
    ex.train()
    runs = []
    for step in (0, 0, 1):
        with Guard(), step_context(7, step, 0):
            runs.append(ex(x, x, x, need_weights=True, average_attn_weights=False)[1].detach())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    kept = runs[0] != 0
    assert 0.3 < float(kept.float().mean()) < 0.7
    assert torch.equal(runs[0][kept], (w0.detach() * 2.0)[kept])


def _same_bits_with_and_without_the_guard(act: Any) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A stock encoder layer with ``act``, its conversion and an input: the
    converted layer gives the same bits under the guard and without it."""
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(16, 2, 32, 0.0, activation=act, batch_first=True)
    e = from_torch(m)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        with Guard():
            inside = e(x)
        outside = e(x)
    assert (f32_bits(inside) == f32_bits(outside)).all()
    return m, e, x


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_converted_encoder_layer_is_exact_outside_the_guard(act: str) -> None:
    """A converted TransformerEncoderLayer keeps its activation as the exact
    function the guard routes torch's to, so called without a guard it gives
    the guard's bits (it ran stock F.gelu there: 1106 entries differed). Control:
    the stock layer with the same weights gives other bits for GELU. An
    activation the spec does not define is refused at conversion."""
    m, e, x = _same_bits_with_and_without_the_guard(act)
    if act == "gelu":
        e.load_state_dict(m.state_dict())  # the stock weights, so only the arithmetic differs
        with torch.no_grad():
            assert not torch.equal(e(x), m.eval()(x))
    elu = nn.TransformerEncoderLayer(16, 2, 32, 0.0, activation=F.elu, batch_first=True)
    with pytest.raises(ConfigError, match="activation 'elu'"):
        from_torch(elu)


@pytest.mark.parametrize("act", [F.tanh, F.sigmoid, torch.tanh, torch.sigmoid,
                                 nn.GELU(approximate="tanh")])
def test_converted_encoder_layer_activation_tanh_sigmoid_and_gelu_tanh(act: object) -> None:
    """F.tanh and F.sigmoid (Python wrappers of the tensor methods) were refused at
    conversion with "docs/exact-spec.md defines ... sigmoid and tanh"; they are torch's
    tanh and sigmoid, so they convert to the spec's. GELU's tanh form as a module stays
    the tanh form. Controls: the same bits under the guard and without it; a partial
    of F.gelu (approximate='tanh') is refused, not run as the erf form."""
    import functools

    _, e, _ = _same_bits_with_and_without_the_guard(act)
    h = torch.randn(4, 32)
    if isinstance(act, nn.Module):
        assert torch.equal(e.activation(h), XF.gelu(h, "tanh"))
        assert not torch.equal(e.activation(h), XF.gelu(h, "none"))
    else:
        with Guard():
            want = act(h)  # the guard's routing of torch's function
        assert torch.equal(e.activation(h), want)
    tanh_gelu = functools.partial(F.gelu, approximate="tanh")
    with pytest.raises(ConfigError, match="activation functools.partial"):
        from_torch(nn.TransformerEncoderLayer(16, 2, 32, 0.0, activation=tanh_gelu))
