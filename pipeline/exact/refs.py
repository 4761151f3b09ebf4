"""The torch references of exact mode's native kernels, and the self-tests
that compare each group of kernels with them (registered with
pipeline/exact/native.py when the package is imported).

A reference is the spec's arithmetic as torch ops (docs/exact-spec.md,
section 14): the implementation the NumPy twin was checked against, the path
that runs without the kernels, and what a kernel must equal bit for bit. Here
live the references that have no other home: GELU and LayerNorm (SiLU,
sigmoid and tanh: ``activations.activation_parts_torch``; the
quantisation's is ``product._quantised_torch``, the fixed tree's
``ops._tree_sum_torch``, the softmax's ``attention._softmax``).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import fused, native
from .activations import KINDS, activation_parts_torch
from .attention import _allowed, _softmax, _softmax_grad
from .consts import ERFC_C, INV_SQRT_2PI, SQRT_2_PI, SQRT_HALF
from .flat import select
from .ops import _scalar, _tree_sum_torch, exp64, sqrt32, tree_sum
from .product import _quantised_torch

__all__ = ["gelu_parts_torch", "layer_norm_torch", "layer_norm_grad_torch",
           "index_tree_sum_torch"]

_F32, _F64 = torch.float32, torch.float64


def gelu_parts_torch(x: Tensor, tanh: bool, grad: bool) -> tuple[Tensor, Tensor | None]:
    """f32 ``y`` and, if ``grad``, f32 ``dy`` of spec section 14's GELU (every
    f64 op separate and rounded; in place where the value is not needed)."""
    d = x.to(_F64)
    if tanh:
        one = torch.ones((), dtype=_F64, device=x.device)
        u = (d * d).mul_(d).mul_(0.044715).add_(d).mul_(SQRT_2_PI)
        sg = one / exp64(u * -2.0).add_(1.0)
        y = (d * sg).to(_F32)
        if not grad:
            return y, None
        du = (d * d).mul_(0.134145).add_(1.0).mul_(SQRT_2_PI)
        dy = (d * 2.0).mul_(du).mul_((one - sg).mul_(sg)).add_(sg)
        return y, dy.to(_F32)
    a = d.mul(-SQRT_HALF).abs_()
    t = a.mul(0.5).add_(1.0).reciprocal_()   # 1 / x: one correctly rounded division
    w = t.mul(ERFC_C[9])
    w.add_(ERFC_C[8])
    for n in range(7, -1, -1):
        w.mul_(t).add_(ERFC_C[n])
    half = exp64(w.sub_(a.mul_(a)), inplace=True).mul_(t).mul_(0.5)   # 0.5 * ec (exact)
    # z >= 0 <=> d <= 0; 0.5 * (2 - ec) == 1 - 0.5 * ec (scaling commutes with rounding).
    # Buffers are reused once their values are dead (t, a): fewer allocations.
    phi = select(d <= 0, half, torch.sub(1.0, half, out=t))
    y = torch.mul(d, phi, out=a).to(_F32)
    if not grad:
        return y, None
    dens = exp64(torch.mul(d, d, out=a).mul_(0.5).neg_(), inplace=True).mul_(INV_SQRT_2PI)
    return y, dens.mul_(d).add_(phi).to(_F32)


def layer_norm_torch(x2: Tensor, w: Tensor | None, b: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm of rows ``x2`` by torch ops (the reference the native kernel
    equals): ``(y, xh, s)``, ``s`` of shape (rows, 1)."""
    fd = _scalar(x2, float(x2.shape[1]))
    d = x2 - (tree_sum(x2, 1) / fd).unsqueeze(1)
    var = tree_sum(d * d, 1) / fd
    s = sqrt32(var + _scalar(var, eps)).unsqueeze(1)     # eps already RN32 (layers)
    xh = d / s
    y = xh
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y, xh, s


def layer_norm_grad_torch(g2: Tensor, xh: Tensor, s: Tensor, w: Tensor | None) -> Tensor:
    """LayerNorm's input gradient by torch ops (the native kernel's reference)."""
    gxh = g2 * w if w is not None else g2
    fd = _scalar(xh, float(xh.shape[1]))
    m1 = (tree_sum(gxh, 1) / fd).unsqueeze(1)
    m2 = (tree_sum(gxh * xh, 1) / fd).unsqueeze(1)
    return ((gxh - m1) - xh * m2) / s


def index_tree_sum_torch(idx: Tensor, g: Tensor, rows: int) -> Tensor:
    """``out[v] = `` the sum of ``g[p]`` over positions ``p`` with ``idx[p] ==
    v``, in the neighbour-pairing tree over all positions where a position
    holding another index is absent (spec section 14, Embedding); ``+0`` for
    a ``v`` that never occurs: the native kernel's reference (and
    functional.index_tree_sum without it). Level by level: entries keyed
    (node, v) in ascending order; a stable sort by (node // 2, v) puts the
    left child's entry just before the right child's, and each such pair is
    one f32 add."""
    node = torch.arange(idx.numel(), device=idx.device)
    key_v, vals = idx.reshape(-1).to(torch.int64), g
    n = idx.numel()
    while n > 1:
        parent = node.div(2, rounding_mode="floor")
        key = parent * rows + key_v
        order = torch.argsort(key, stable=True)
        key, vals, parent, key_v = key[order], vals[order], parent[order], key_v[order]
        first = torch.ones_like(key, dtype=torch.bool)
        first[1:] = key[1:] != key[:-1]
        starts = first.nonzero().squeeze(1)
        merged = vals[starts]
        second = (~first).nonzero().squeeze(1)
        if second.numel():
            merged[first.cumsum(0)[second] - 1] = vals[second - 1] + vals[second]
        node, key_v, vals = parent[starts], key_v[starts], merged
        n = (n + 1) // 2
    out = g.new_zeros(rows, g.shape[1])
    out[key_v] = vals  # distinct indices: data movement
    return out


# ---------------------------------------------------------------- self-tests
# Each: None if the group's kernels equal their references bit for bit on a
# fixed input set (native.check_values), else what differed.
def _check_gelu(lib: ctypes.CDLL) -> str | None:
    x = native.check_values()
    for tanh in (False, True):
        for grad in (False, True):
            want, got = gelu_parts_torch(x, tanh, grad), fused._gelu(lib, x, tanh, grad)
            if not (native.same(want[0], got[0]) and native.same(want[1], got[1])):
                return f"GELU ({'tanh' if tanh else 'erf'}) differs from its torch reference"
    return None


def _check_quantise(lib: ctypes.CDLL) -> str | None:
    x = native.check_values()
    for shape, dim in (((60, 130), -1), ((130, 60), -2), ((3, 64, 5), -2), ((5, 200), -1)):
        xs = x[:torch.Size(shape).numel()].reshape(shape)
        for p, lo_first in ((24, True), (23, False), (24, False)):
            if not native.same(_quantised_torch(xs, dim, p, lo_first),
                               fused._quantise(lib, xs, dim, p, lo_first)):
                return f"the quantisation of {shape} along {dim} differs from its torch reference"
    return None


def _finite(n: int, bound: float, seed: int) -> Tensor:
    return native.check_values(n, seed)[20:20 + n].clamp(-bound, bound)


def _check_tree(lib: ctypes.CDLL) -> str | None:
    for shape, dim in (((37, 21), 0), ((37, 21), 1), ((1, 5), 0), ((300, 2), 0), ((4, 3, 129), 2)):
        xs = _finite(torch.Size(shape).numel(), 1e30, 1).reshape(shape)
        if not native.same(_tree_sum_torch(xs, dim), fused._tree_sum(lib, xs, dim)):
            return f"the fixed tree over dim {dim} of {shape} differs from its torch reference"
    return None


def _check_layer_norm(lib: ctypes.CDLL) -> str | None:
    xl, gl = _finite(30 * 48, 1e15, 2).reshape(30, 48), _finite(30 * 48, 1e15, 3).reshape(30, 48)
    wl, bl = _finite(48, 1e3, 4), _finite(48, 1e3, 5)
    for w, b in ((wl, bl), (wl, None), (None, None)):
        want = layer_norm_torch(xl, w, b, 1e-5)
        if not all(native.same(a, e) for a, e in zip(fused._layer_norm(lib, xl, w, b, 1e-5), want)):
            return "LayerNorm differs from its torch reference"
        if not native.same(layer_norm_grad_torch(gl, want[1], want[2], w),
                           fused._layer_norm_grad(lib, gl, want[1], want[2], w)):
            return "LayerNorm's gradient differs from its torch reference"
    return None


def _check_softmax(lib: ctypes.CDLL) -> str | None:
    z = _finite(720, 80.0, 6).reshape(2, 3, 10, 12)
    gp = _finite(720, 1e30, 7).reshape(z.shape)
    for causal in (True, False):
        allowed = _allowed(z, causal)
        want = _softmax(z, allowed)[0]
        if not native.same(want, fused._softmax(lib, z, causal)):
            return "attention's softmax differs from its torch reference"
        if not native.same(_softmax_grad(gp, want, allowed)[0],
                           fused._softmax_grad(lib, gp, want, causal)):
            return "attention's softmax gradient differs from its torch reference"
    return None


def _check_index_tree(lib: ctypes.CDLL) -> str | None:
    g = _finite(37 * 5, 1e30, 8).reshape(37, 5)
    runs = torch.tensor([3, 3, 3, 0, 3, 6, 6, 1, 0, 3, 3, 3, 3, 6, 0, 0, 0, 3, 1])
    for idx in (runs.repeat(2)[:37], torch.arange(37) % 7, torch.zeros(37, dtype=torch.int64),
                torch.tensor([4]), torch.tensor([5, 2, 5])):
        gs = g[:idx.numel()]
        if not native.same(index_tree_sum_torch(idx, gs, 8), fused._index_tree(lib, idx, gs, 8)):
            return "Embedding's gradient (the tree per index) differs from its torch reference"
    return None


def _check_activation(lib: ctypes.CDLL) -> str | None:
    x = native.check_values()
    for k, kind in enumerate(KINDS):
        for grad in (False, True):
            want = activation_parts_torch(kind, x, grad)
            got = fused._activation(lib, k, x, grad)
            if not (native.same(want[0], got[0]) and native.same(want[1] if grad else None,
                                                                   got[1])):
                return f"{kind} differs from its torch reference"
    return None


native.register("gelu", _check_gelu)
native.register("activation", _check_activation)
native.register("quantise", _check_quantise)
native.register("tree", _check_tree)
native.register("layer_norm", _check_layer_norm)
native.register("softmax", _check_softmax)
native.register("index_tree", _check_index_tree)
