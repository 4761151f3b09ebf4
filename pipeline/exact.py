"""Exact mode: a model and optimisers whose every result bit is fixed by
docs/exact-spec.md and IEEE-754 (not by the torch version, ISA, thread count
or device). Explicit forward/backward, no autograd.

The operations (``xmm``, ``tree_sum``, ``xexp``, ...) live in
``pipeline.exact_layers`` and are re-exported here; this module holds the
network (sections 3 and 6) and the optimisers (section 9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import rng
from .config import ModelConfig, OptimConfig
from .errors import CheckpointError
from .exact_layers import (col2im, im2col, mm_quantised, quantise, relu_dropout, relu_dropout_grad,
                           softmax_xent, sqrt32, tree_sum, tree_sum_list, xexp, xlog, xmm)

__all__ = ["xmm", "tree_sum", "tree_sum_list", "xexp", "xlog", "sqrt32", "softmax_xent", "ExactNet",
           "ExactSGD", "ExactAdam", "make_exact_optimizer"]

_F32 = torch.float32


def rn32(x: float) -> float:
    """``RN32(x)`` of an f64 as a Python float (exactly an f32 value), so that
    torch's own cast of the scalar to f32 is exact."""
    return float(np.float32(x))


@dataclass(frozen=True)
class _Layer:
    """One parametrised layer: ``kind`` "fc" or "conv"; conv geometry."""

    name: str
    shape: tuple[int, ...]  # weight shape, torch layout
    kind: str = "fc"
    stride: int = 1
    pad: int = 0


def _layers(cfg: ModelConfig, in_features: int) -> list[_Layer]:
    """The parametrised layers in forward order (spec section 3)."""
    if cfg.arch == "cnn":
        return [_Layer("conv0", (8, 1, 3, 3), "conv", 1, 1),
                _Layer("conv1", (16, 8, 3, 3), "conv", 2, 1), _Layer("fc0", (10, 256))]
    if cfg.arch != "mlp":
        raise ValueError(f"model.arch: expected 'mlp' or 'cnn', found {cfg.arch!r}")
    dims = [in_features, *cfg.hidden, 10]
    return [_Layer(f"fc{i}", (dims[i + 1], dims[i])) for i in range(len(dims) - 1)]


def _init_tensor(seed: int, layer: int, which: int, shape: tuple[int, ...],
                 bound: np.float32) -> Tensor:
    """``f32((u24 - 2^23) * 2^-23) * bound`` row-major (spec section 3): the
    first factor is a 24-bit integer times a power of two (exact in f32), the
    product one IEEE f32 multiply (NumPy)."""
    count = math.prod(shape)
    u = rng.u24(rng.key(seed, rng.INIT, layer, which), 0, count)
    unit = (u - (1 << 23)).astype(np.float32) * np.float32(2.0**-23)
    return torch.from_numpy((unit * bound).reshape(shape))


def _flat_views(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Copies of ``tensors`` as contiguous views laid end to end in one new
    buffer on ``device`` (see ``_flat_of``)."""
    flat = torch.empty(sum(t.numel() for t in tensors.values()), dtype=_F32, device=device)
    out, off = {}, 0
    for name, t in tensors.items():
        out[name] = flat[off:off + t.numel()].view(t.shape)
        out[name].copy_(t)
        off += t.numel()
    return out


def _flat_of(ts: list[Tensor]) -> Tensor | None:
    """One 1-D view over ``ts`` when they are contiguous f32 tensors laid end
    to end in one storage (in list order), else None. Elementwise formulas
    give the same bits on the view as on each tensor."""
    first = ts[0]
    base, off = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in ts:
        if (t.dtype != _F32 or not t.is_contiguous() or t.storage_offset() != off
                or t.untyped_storage().data_ptr() != base):
            return None
        off += t.numel()
    return first.as_strided((off - first.storage_offset(),), (1,), first.storage_offset())


@dataclass
class _Cache:
    """What backward needs: each layer's input (a matrix) and its im2col, the
    pass masks after each hidden layer, the batch size."""

    inputs: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    rows: int = 0
    dropped: bool = False  # dropout was applied (masks carry the keep masks)


class ExactNet:
    """The spec's MLP or CNN with explicit forward and backward.

    ``params`` maps the spec's names to f32 tensors on ``device``; the
    optimisers update them in place (or rebind entries). Quantised weights
    are cached per (tensor, version counter), so the shards of one step
    quantise each weight once per direction; any in-place update or rebinding
    invalidates the entry.
    """

    def __init__(self, model_cfg: ModelConfig, seed: int, device: torch.device | str = "cpu",
                 *, in_features: int = 64) -> None:
        # in_features: the MLP's input width; the spec's is 64 (benchmarks vary it)
        self.cfg = model_cfg
        self.device = torch.device(device)
        self.layers = _layers(model_cfg, in_features)
        self.rate = model_cfg.dropout if model_cfg.arch == "mlp" else 0.0
        self.scale = rn32(1.0 / (1.0 - self.rate))
        init: dict[str, Tensor] = {}
        for li, layer in enumerate(self.layers):
            fan_in = math.prod(layer.shape[1:])
            bound = np.float32(1.0 / math.sqrt(fan_in))
            for which, suffix, shape in ((0, "weight", layer.shape), (1, "bias", layer.shape[:1])):
                init[f"{layer.name}.{suffix}"] = _init_tensor(seed, li, which, shape, bound)
        # Views of one flat buffer, end to end in this order: the optimisers
        # then update every parameter with one op per formula step.
        self.params = _flat_views(init, self.device)
        self._qcache: dict[tuple[str, int], tuple[Tensor, int, int, Tensor]] = {}

    def dropout_shapes(self, rows: int) -> list[int]:
        """Width ``F`` of each dropout site in forward order (the masks are
        ``(rows, F)``); empty without dropout or for the CNN."""
        return self.dropout_widths()

    def dropout_widths(self) -> list[int]:
        """``dropout_shapes`` without the row count (pipeline.model's Net protocol)."""
        if self.rate == 0.0:
            return []
        return [layer.shape[0] for layer in self.layers[:-1]]

    def _wq(self, name: str, dim: int) -> Tensor:
        """``quantise(W, dim)`` of weight ``name`` as a matrix, cached while the
        tensor object, its storage and its version counter are unchanged."""
        w = self.params[name]
        try:
            ver = w._version
        except RuntimeError:  # inference tensors have no version counter
            return quantise(w.reshape(w.shape[0], -1), dim)
        hit = self._qcache.get((name, dim))
        if hit is not None and hit[0] is w and hit[1] == ver and hit[2] == w.data_ptr():
            return hit[3]
        q = quantise(w.reshape(w.shape[0], -1), dim)
        self._qcache[(name, dim)] = (w, ver, w.data_ptr(), q)
        return q

    def _linear(self, x: Tensor, name: str) -> Tensor:
        """``xmm(x, W^T) + b`` (bias added per row, f32); ``x`` is (rows, in)."""
        y = mm_quantised(quantise(x, 1), self._wq(f"{name}.weight", 1).T)
        return y.add_(self.params[f"{name}.bias"])

    def forward(self, x: Tensor, keep: list[Tensor] | None) -> tuple[Tensor, _Cache]:
        """Logits (rows, 10) and the cache for ``backward``. ``keep``: one bool
        (rows, F) mask per dropout site, None for no dropout (evaluation)."""
        sites = self.dropout_shapes(x.shape[0])
        if keep is not None and len(keep) != len(sites):
            raise ValueError(f"keep: expected {len(sites)} dropout masks, found {len(keep)}")
        x = x.to(self.device, _F32)
        cache = _Cache(rows=x.shape[0], dropped=bool(keep) and bool(sites))
        h = x.reshape(x.shape[0], 8, 8, 1) if self.cfg.arch == "cnn" else x  # NHWC, C = 1
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            if layer.kind == "conv":
                h = im2col(h, layer.shape[2], layer.shape[3], layer.stride, layer.pad)
            elif h.dim() == 4:  # flatten channels-last (N, H, W, C) in (C, H, W) order
                h = h.permute(0, 3, 1, 2).reshape(h.shape[0], -1)
            cache.inputs.append(h)
            y = self._linear(h, layer.name)  # conv: (N*Ho*Wo, O)
            if last:
                return y, cache
            k = keep[i] if keep is not None and cache.dropped else None
            h, mask = relu_dropout(y, k, self.scale)
            cache.masks.append(mask)
            if layer.kind == "conv":
                side = math.isqrt(y.shape[0] // cache.rows)
                h = h.view(cache.rows, side, side, -1)
        raise AssertionError("unreachable: the last layer returns")

    def backward(self, cache: _Cache, g_logits: Tensor) -> dict[str, Tensor]:
        """Gradients per parameter name from the logits' gradient (spec section
        6: ``gW = xmm(gy^T, x)``, ``gb = tree_sum(gy, 0)``, ``gx = xmm(gy, W)``)."""
        grads: dict[str, Tensor] = {}
        g = g_logits.to(self.device, _F32)
        for i in range(len(self.layers) - 1, -1, -1):
            layer, x = self.layers[i], cache.inputs[i]
            gw = mm_quantised(quantise(g, 0).T, quantise(x, 0))
            grads[f"{layer.name}.weight"] = gw.view(layer.shape)
            grads[f"{layer.name}.bias"] = tree_sum(g, 0)
            if i == 0:
                break
            gx = mm_quantised(quantise(g, 1), self._wq(f"{layer.name}.weight", 0))
            if layer.kind == "conv":
                c, kh, kw = layer.shape[1:]
                side = math.isqrt(cache.inputs[i - 1].shape[0] // cache.rows)
                gx = col2im(gx, (cache.rows, side, side, c), kh, kw, layer.stride, layer.pad)
                gx = gx.reshape(-1, c)
            elif self.layers[i - 1].kind == "conv":  # unflatten (C, H, W) -> (N*H*W, C)
                c = self.layers[i - 1].shape[0]
                side = math.isqrt(gx.shape[1] // c)
                gx = gx.view(-1, c, side, side).permute(0, 2, 3, 1).reshape(-1, c)
            scale = self.scale if cache.dropped else None
            g = relu_dropout_grad(gx, cache.masks[i - 1], scale)
        return grads

    def shard_grads(self, x: Tensor, y: Tensor, n_global: int,
                    keep: list[Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward, softmax cross-entropy (``N = n_global``), backward on one
        shard: (``tree_sum`` of the shard's per-row losses, 0-dim f32; grads)."""
        logits, cache = self.forward(x, keep)
        lse, g = softmax_xent(logits, y, n_global)
        return tree_sum(lse, 0), self.backward(cache, g)

    def predict(self, x: Tensor) -> Tensor:
        """Logits without dropout."""
        return self.forward(x, None)[0]


def _check_state(expected: dict[str, Tensor], tensors: dict[str, Tensor],
                 scalars: dict[str, Any], scalar_keys: dict[str, type]) -> None:
    """Raise CheckpointError (a ValueError) naming the first key that is
    missing, unexpected, or of the wrong shape, dtype or type."""
    _check_keys(expected, tensors, "optimiser state tensor")
    for key, want in expected.items():
        got = tensors[key]
        if not isinstance(got, Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            found = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, Tensor) else type(got)
            raise CheckpointError(key, f"{tuple(want.shape)} {want.dtype}", str(found))
    _check_keys(scalar_keys, scalars, "optimiser state scalar")
    for key, tp in scalar_keys.items():
        v = scalars[key]
        if isinstance(v, bool) or not isinstance(v, tp):
            raise CheckpointError(key, f"a {tp.__name__}", repr(v))


def _check_keys(expected: dict[str, Any], got: dict[str, Any], what: str) -> None:
    for key in sorted(set(expected) | set(got)):
        if key not in got:
            raise CheckpointError(key, f"an {what}", "nothing (missing)")
        if key not in expected:
            raise CheckpointError(key, f"no such {what}", "an extra one")


class _Optimizer:
    """Shared machinery: named f32 state tensors (``<slot>.<param name>``,
    views of one flat buffer per slot), JSON-able scalars, and the choice
    between one flat update and one update per parameter (same bits)."""

    def __init__(self, params: dict[str, Tensor], slots: tuple[str, ...]) -> None:
        self.params = params
        self.t = 0
        self.slots = slots
        self.state: dict[str, Tensor] = {}
        self._flat_state: list[Tensor] = []
        for slot in slots:
            zeros = {name: torch.zeros_like(p) for name, p in params.items()}
            device = next(iter(params.values())).device
            views = _flat_views(zeros, device)
            self.state.update({f"{slot}.{name}": v for name, v in views.items()})
            flat = _flat_of(list(views.values()))
            assert flat is not None
            self._flat_state.append(flat)
        # The flat view over the parameters, valid while the dict holds these
        # very tensors on the same memory (checked each step: cheap).
        self._flat_theta = _flat_of(list(params.values()))
        self._layout = [(p, p.data_ptr()) for p in params.values()]

    def _update(self, theta: Tensor, g: Tensor, state: list[Tensor]) -> None:
        raise NotImplementedError

    def _apply(self, grads: dict[str, Tensor]) -> None:
        """``_update`` once on flat views when the parameters still form one
        flat buffer (the gradients concatenated), else once per parameter."""
        names = list(self.params)
        theta = self._flat_theta
        if theta is not None and len(names) == len(self._layout) and all(
                self.params[n] is p and p.data_ptr() == ptr
                for n, (p, ptr) in zip(names, self._layout)):
            g = torch.cat([grads[n].reshape(-1) for n in names])
            self._update(theta, g, self._flat_state)
            return
        for n in names:
            self._update(self.params[n], grads[n], [self.state[f"{s}.{n}"] for s in self.slots])

    def state_tensors(self) -> dict[str, Tensor]:
        """Every state tensor by name (``<slot>.<param name>``)."""
        return dict(self.state)

    def state_scalars(self) -> dict[str, int | float]:
        return {"step": self.t}

    def _scalar_types(self) -> dict[str, type]:
        return {"step": int}

    def load_state(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
        """Restore exactly what ``state_tensors``/``state_scalars`` returned;
        raise CheckpointError (a ValueError) naming any wrong key. Copies into
        the existing buffers (which stay flat)."""
        _check_state(self.state, tensors, scalars, self._scalar_types())
        for key, t in tensors.items():
            self.state[key].copy_(t.detach())
        self._load_scalars(scalars)

    def _load_scalars(self, scalars: dict[str, Any]) -> None:
        self.t = scalars["step"]


class ExactSGD(_Optimizer):
    """SGD with optional momentum and L2 weight decay, spec section 9: each
    op a separate f32 op, constants rounded to f32 once."""

    def __init__(self, params: dict[str, Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, ("momentum",) if momentum != 0 else ())
        self.lr, self.mu, self.wd = rn32(lr), rn32(momentum), rn32(weight_decay)
        self.use_wd = weight_decay != 0

    def step(self, grads: dict[str, Tensor]) -> None:
        """``theta = theta - buf * lr`` with ``buf = buf * mu + g`` (``g`` on
        the first step), ``g = g + wd * theta`` first when ``wd != 0``."""
        self._apply(grads)
        self.t += 1

    def _update(self, theta: Tensor, g: Tensor, state: list[Tensor]) -> None:
        if self.use_wd:
            g = g + theta * self.wd
        buf = g
        if state:  # momentum
            buf = state[0]
            if self.t == 0:
                buf.copy_(g)
            else:
                buf.mul_(self.mu).add_(g)
        theta.sub_(buf * self.lr)


class ExactAdam(_Optimizer):
    """Adam in the L2 form (not AdamW), spec section 9; bias corrections from
    f64 running products ``b1p``, ``b2p`` rounded to f32 once per step."""

    def __init__(self, params: dict[str, Tensor], lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, ("m", "v"))
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.b1, self.b2 = rn32(beta1), rn32(beta2)
        self.c1, self.c2 = rn32(1.0 - beta1), rn32(1.0 - beta2)
        self.eps, self.wd, self.use_wd = rn32(eps), rn32(weight_decay), weight_decay != 0
        self.b1p = self.b2p = 1.0
        self._step, self._bc2 = 0.0, 1.0

    def step(self, grads: dict[str, Tensor]) -> None:
        """One Adam step; every tensor op is a single IEEE f32 op."""
        self.t += 1
        self.b1p *= self.beta1
        self.b2p *= self.beta2
        self._step = rn32(self.lr / (1.0 - self.b1p))
        self._bc2 = rn32(1.0 - self.b2p)
        self._apply(grads)

    def _update(self, theta: Tensor, g: Tensor, state: list[Tensor]) -> None:
        if self.use_wd:
            g = g + theta * self.wd
        m, v = state
        m.mul_(self.b1).add_(g * self.c1)
        v.mul_(self.b2).add_((g * g).mul_(self.c2))
        # a tensor divisor on v's device: see the module docstring of exact_layers
        bc2 = torch.full((), self._bc2, dtype=_F32, device=v.device)
        den = sqrt32(v / bc2).add_(self.eps)
        theta.sub_((m / den).mul_(self._step))

    def state_scalars(self) -> dict[str, int | float]:
        return {"step": self.t, "b1p": self.b1p, "b2p": self.b2p}

    def _scalar_types(self) -> dict[str, type]:
        return {"step": int, "b1p": float, "b2p": float}

    def _load_scalars(self, scalars: dict[str, Any]) -> None:
        self.t, self.b1p, self.b2p = scalars["step"], scalars["b1p"], scalars["b2p"]


def make_exact_optimizer(optim_cfg: OptimConfig, params: dict[str, Tensor]) -> _Optimizer:
    """The exact optimiser the config names ("sgd" or "adam")."""
    if optim_cfg.name == "sgd":
        return ExactSGD(params, optim_cfg.lr, optim_cfg.momentum, optim_cfg.weight_decay)
    if optim_cfg.name == "adam":
        return ExactAdam(params, optim_cfg.lr, optim_cfg.beta1, optim_cfg.beta2, optim_cfg.eps,
                         optim_cfg.weight_decay)
    raise ValueError(f"optim.name: expected 'sgd' or 'adam', found {optim_cfg.name!r}")
