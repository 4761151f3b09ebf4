"""Exact mode's native kernels as functions on tensors (pipeline/exact/native.py
builds the library): each returns what its torch reference returns, bit for
bit, or None where the kernels do not apply (a CUDA tensor, another dtype, a
shape they do not take, an autograd graph to build, no library, a failed
self-test), and the caller then runs the reference. The references and the
self-tests: pipeline/exact/refs.py."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import consts, native

__all__ = ["gelu", "activation", "quantise", "softmax", "softmax_grad", "tree_sum", "layer_norm",
           "layer_norm_grad", "index_tree"]

_MAXS = 4096  # kernels.c's MAXS: the longest row the row kernels take
GRAIN = consts.GRAIN


def usable(group: str, *xs: Tensor) -> ctypes.CDLL | None:
    """The library, if ``group``'s kernels apply to ``xs``: CPU float32 and
    nothing for autograd to track (a kernel's result has no graph, no
    forward-mode tangent and no functorch batching), else None."""
    if not all(x.device.type == "cpu" and x.dtype == torch.float32 for x in xs):
        return None
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return None
    if forward_ad._current_level >= 0 or any(_wrapped(x) for x in xs):
        return None
    return native.kernels(group)


def _wrapped(x: Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def _threads(work: int) -> int:
    """Threads for a kernel call over ``work`` elements: torch's count for
    large calls, 1 below torch's own grain size (no OpenMP team is started
    for small work, as ATen does; a team started before a fork hangs the
    child's next parallel region)."""
    return torch.get_num_threads() if work >= GRAIN else 1


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _gelu(lib: ctypes.CDLL, x: Tensor, tanh: bool, grad: bool) -> tuple[Tensor, Tensor | None]:
    xc = x.contiguous()
    y = torch.empty_like(xc)
    dy = torch.empty_like(xc) if grad else None
    lib.px_gelu(xc.data_ptr(), y.data_ptr(), _ptr(dy), xc.numel(), int(tanh),
                _threads(xc.numel()))
    return y, dy


def gelu(x: Tensor, tanh: bool, grad: bool) -> tuple[Tensor, Tensor | None] | None:
    """``refs.gelu_parts_torch`` natively (shape of ``x``), or None."""
    lib = usable("gelu", x)
    return None if lib is None else _gelu(lib, x, tanh, grad)


def _activation(lib: ctypes.CDLL, kind: int, x: Tensor,
                grad: bool) -> tuple[Tensor, Tensor | None]:
    xc = x.contiguous()
    y = torch.empty_like(xc)
    dy = torch.empty_like(xc) if grad else None
    lib.px_activation(xc.data_ptr(), y.data_ptr(), _ptr(dy), xc.numel(), kind,
                      _threads(xc.numel()))
    return y, dy


def activation(kind: int, x: Tensor, grad: bool) -> tuple[Tensor, ...] | None:
    """``activations.activation_parts_torch`` (kind 0 SiLU, 1 sigmoid, 2 tanh)
    natively: ``(y,)`` or ``(y, dy)`` of ``x``'s shape, or None."""
    lib = usable("activation", x)
    if lib is None:
        return None
    y, dy = _activation(lib, kind, x, grad)
    return (y, dy) if dy is not None else (y,)


def _quantise(lib: ctypes.CDLL, x: Tensor, dim: int, p: int, lo_first: bool) -> Tensor:
    k = x.shape[dim]
    nt = _threads(x.numel())
    if dim == -1:  # x is not empty (quantise): any row stride, unit column stride
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], 2 * k, dtype=torch.float64, device="cpu")
        lib.px_quantise_rows(x2.data_ptr(), x2.shape[0], k, x2.stride(0), out.data_ptr(), p,
                             int(lo_first), nt)
        return out.view(*x.shape[:-1], 2 * k)
    n = x.shape[-1]
    x3 = x.reshape(-1, k, n)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    out = torch.empty(x3.shape[0], 2 * k, n, dtype=torch.float64, device="cpu")
    lib.px_quantise_cols(x3.data_ptr(), x3.shape[0], k, n, x3.stride(1), x3.stride(0),
                         out.data_ptr(), p, int(lo_first), nt)
    return out.view(*x.shape[:-2], 2 * k, n)


def quantise(x: Tensor, dim: int, p: int, lo_first: bool) -> Tensor | None:
    """``product._quantised_torch`` (``dim`` -1 or -2) natively, or None."""
    if x.numel() == 0:
        return None
    lib = usable("quantise", x)
    return None if lib is None else _quantise(lib, x, dim, p, lo_first)


def _softmax(lib: ctypes.CDLL, z: Tensor, causal: bool) -> Tensor:
    zc = z.contiguous()
    p = torch.empty_like(zc)
    s, t = zc.shape[-1], zc.shape[-2]
    lib.px_softmax(zc.data_ptr(), p.data_ptr(), zc.numel() // max(s, 1), s, t, int(causal),
                   _threads(zc.numel()))
    return p


def _softmax_grad(lib: ctypes.CDLL, gp: Tensor, p: Tensor, causal: bool) -> Tensor:
    gc, pc = gp.contiguous(), p.contiguous()
    gz = torch.empty_like(pc)
    s, t = pc.shape[-1], pc.shape[-2]
    lib.px_softmax_grad(gc.data_ptr(), pc.data_ptr(), gz.data_ptr(), pc.numel() // max(s, 1),
                        s, t, int(causal), _threads(pc.numel()))
    return gz


def softmax(z: Tensor, causal: bool) -> Tensor | None:
    """``attention._softmax`` over the last dim of ``z (..., T, S)`` (causal:
    query ``i`` sees keys ``j <= i``), natively, or None."""
    lib = usable("softmax", z)
    if lib is None or z.dim() < 2 or not 0 < z.shape[-1] <= _MAXS:
        return None
    return _softmax(lib, z, causal)


def softmax_grad(gp: Tensor, p: Tensor, causal: bool) -> Tensor | None:
    """``attention._softmax_grad`` natively, or None."""
    lib = usable("softmax", gp, p)
    if lib is None or p.dim() < 2 or not 0 < p.shape[-1] <= _MAXS or gp.shape != p.shape:
        return None
    return _softmax_grad(lib, gp, p, causal)


def _tree_sum(lib: ctypes.CDLL, x: Tensor, dim: int) -> Tensor:
    xc = x.contiguous()
    nt = _threads(xc.numel())
    if dim == xc.dim() - 1:
        s = xc.shape[-1]
        out = torch.empty(xc.shape[:-1], dtype=torch.float32, device="cpu")
        lib.px_tree_rows(xc.data_ptr(), out.data_ptr(), xc.numel() // s, s, nt)
        return out
    rows, n = xc.shape
    work = torch.empty(n * ((rows + 1) // 2), dtype=torch.float32, device="cpu")  # half the input
    out = torch.empty(n, dtype=torch.float32, device="cpu")
    lib.px_tree_cols(xc.data_ptr(), out.data_ptr(), rows, n, work.data_ptr(), nt)
    return out


def tree_sum(x: Tensor, dim: int) -> Tensor | None:
    """``ops.tree_sum`` of f32 ``x`` (``dim`` the last, at most 4096 long, or
    dim 0 of a 2-D ``x``; at least 2 long) natively, or None."""
    lib = usable("tree", x)
    if lib is None or x.dim() == 0 or x.shape[dim] < 2 or 0 in x.shape:
        return None
    if dim == x.dim() - 1 and x.shape[dim] <= _MAXS or dim == 0 and x.dim() == 2:
        return _tree_sum(lib, x, dim)
    return None


def _layer_norm(lib: ctypes.CDLL, x2: Tensor, w: Tensor | None, b: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    xc = x2.contiguous()
    rows, d = xc.shape
    y, xh = torch.empty_like(xc), torch.empty_like(xc)
    s = torch.empty(rows, 1, dtype=torch.float32, device="cpu")
    lib.px_layer_norm(xc.data_ptr(), _ptr(w), _ptr(b), eps, y.data_ptr(), xh.data_ptr(),
                      s.data_ptr(), rows, d, _threads(xc.numel()))
    return y, xh, s


def _layer_norm_grad(lib: ctypes.CDLL, g2: Tensor, xh: Tensor, s: Tensor,
                     w: Tensor | None) -> Tensor:
    gc = g2.contiguous()
    gx = torch.empty_like(gc)
    rows, d = gc.shape
    lib.px_layer_norm_grad(gc.data_ptr(), xh.data_ptr(), s.data_ptr(), _ptr(w), gx.data_ptr(),
                           rows, d, _threads(gc.numel()))
    return gx


def _ln_ok(x2: Tensor, w: Tensor | None, b: Tensor | None,
           *saved: Tensor) -> ctypes.CDLL | None:
    """The library, if the LayerNorm kernels take rows ``x2`` (d <= 4096),
    parameters of shape (d,) and contiguous saved tensors, else None."""
    if x2.dim() != 2 or not 0 < x2.shape[1] <= _MAXS:
        return None
    params = [t for t in (w, b) if t is not None]
    if not all(t.shape == x2.shape[1:] and t.is_contiguous() for t in params) or not all(
            t.is_contiguous() for t in saved):
        return None
    return usable("layer_norm", x2, *params, *saved)


def layer_norm(x2: Tensor, w: Tensor | None, b: Tensor | None,
               eps: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """``refs.layer_norm_torch`` (y, xh, s) for rows ``x2`` natively, or None."""
    lib = _ln_ok(x2, w, b)
    return None if lib is None else _layer_norm(lib, x2, w, b, eps)


def layer_norm_grad(g2: Tensor, xh: Tensor, s: Tensor, w: Tensor | None) -> Tensor | None:
    """``refs.layer_norm_grad_torch`` natively, or None."""
    if xh.shape != g2.shape or g2.dim() != 2 or s.shape != (g2.shape[0], 1):
        return None
    lib = _ln_ok(g2, w, None, xh, s)
    return None if lib is None else _layer_norm_grad(lib, g2, xh, s, w)


def _index_tree(lib: ctypes.CDLL, idx: Tensor, g: Tensor, rows: int) -> Tensor:
    flat = idx.reshape(-1).to(torch.int64)
    nodes = torch.argsort(flat, stable=True)           # positions grouped by index
    ends = torch.bincount(flat, minlength=rows).cumsum_(0)
    vals = g.index_select(0, nodes)                    # rows in that order, contiguous
    out = torch.zeros(rows, g.shape[1], dtype=torch.float32, device="cpu")
    lib.px_index_tree(nodes.data_ptr(), vals.data_ptr(), ends.data_ptr(), rows, g.shape[1],
                      out.data_ptr(), _threads(vals.numel()))
    return out


def index_tree(idx: Tensor, g: Tensor, rows: int) -> Tensor | None:
    """``refs.index_tree_sum_torch`` natively (``g``: one f32 row per index,
    every index in [0, rows)), or None."""
    if idx.device.type != "cpu" or idx.is_floating_point() or idx.is_complex() or _wrapped(idx) \
            or g.dim() != 2 or idx.numel() != g.shape[0] or rows < 1:
        return None
    lib = usable("index_tree", g)
    if lib is None:
        return None
    flat = idx.reshape(-1).to(torch.int64)  # any integer dtype (aminmax takes no unsigned ones)
    if flat.numel():
        lo, hi = torch.aminmax(flat)
        if int(lo) < 0 or int(hi) >= rows:
            return None
    return _index_tree(lib, flat, g, rows)
