"""Exact mode's network (docs/exact-spec.md, sections 3 and 6): the spec's MLP
or CNN with explicit forward and backward passes built from pipeline.exact.ops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..core import rng
from .flat import F32 as _F32
from .flat import flat_views, rn32
from .ops import (
    col2im,
    im2col,
    mm_quantised,
    quantise,
    relu_dropout,
    relu_dropout_grad,
    softmax_xent,
    tree_sum,
)

__all__ = ["ExactNet", "Arch"]


@dataclass(frozen=True)
class Arch:
    """Which of the spec's networks: "mlp" (hidden sizes, dropout) or "cnn"."""

    arch: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    dropout: float = 0.1


@dataclass(frozen=True)
class _Layer:
    """One parametrised layer: ``kind`` "fc" or "conv"; conv geometry."""

    name: str
    shape: tuple[int, ...]  # weight shape, torch layout
    kind: str = "fc"
    stride: int = 1
    pad: int = 0


def _layers(cfg: Arch, input_shape: tuple[int, ...], n_classes: int) -> list[_Layer]:
    """The parametrised layers in forward order (spec section 3) for inputs of
    ``input_shape`` (C, H, W) and ``n_classes`` outputs."""
    if cfg.arch == "cnn":
        c, h, w = input_shape
        h2, w2 = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # 3x3, stride 2, pad 1
        return [_Layer("conv0", (8, c, 3, 3), "conv", 1, 1),
                _Layer("conv1", (16, 8, 3, 3), "conv", 2, 1),
                _Layer("fc0", (n_classes, 16 * h2 * w2))]
    if cfg.arch != "mlp":
        raise ValueError(f"arch: expected 'mlp' or 'cnn', found {cfg.arch!r}")
    dims = [math.prod(input_shape), *cfg.hidden, n_classes]
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

    # Exact ops are thread-invariant: shards run in order and --threads sets torch's
    # own threads (not pipeline.train.net.Threadable).

    def __init__(self, model_cfg: Arch, seed: int, device: torch.device | str = "cpu",
                 *, input_shape: tuple[int, ...] = (1, 8, 8), n_classes: int = 10) -> None:
        # The defaults are the spec's digits shapes; a run passes its dataset's.
        self.cfg = model_cfg
        self.device = torch.device(device)
        self.input_shape = tuple(input_shape)
        self.layers = _layers(model_cfg, self.input_shape, n_classes)
        self.rate = model_cfg.dropout if model_cfg.arch == "mlp" else 0.0
        self.dropout_rate = self.rate
        self.scale = rn32(1.0 / (1.0 - self.rate))
        init: dict[str, Tensor] = {}
        for li, layer in enumerate(self.layers):
            fan_in = math.prod(layer.shape[1:])
            bound = np.float32(1.0 / math.sqrt(fan_in))
            for which, suffix, shape in ((0, "weight", layer.shape), (1, "bias", layer.shape[:1])):
                init[f"{layer.name}.{suffix}"] = _init_tensor(seed, li, which, shape, bound)
        # Views of one flat buffer, end to end in this order: the optimisers
        # then update every parameter with one op per formula step.
        self.params = flat_views(init, self.device)
        self.trainable = self.params  # the spec's nets freeze nothing
        self.buffers: dict[str, Tensor] = {}  # the spec's nets keep no training-time state
        self._qcache: dict[tuple[str, int], tuple[Tensor, int, int, Tensor]] = {}

    def dropout_widths(self) -> list[int]:
        """Width ``F`` of each dropout site in forward order (the masks are
        ``(rows, F)``); empty without dropout or for the CNN."""
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
        sites = self.dropout_widths()
        if keep is not None and len(keep) != len(sites):
            raise ValueError(f"keep: expected {len(sites)} dropout masks, found {len(keep)}")
        x = x.to(self.device, _F32)
        cache = _Cache(rows=x.shape[0], dropped=bool(keep) and bool(sites))
        if self.cfg.arch == "cnn":  # (N, C*H*W) in (C, H, W) order -> NHWC
            h = x.reshape(x.shape[0], *self.input_shape).permute(0, 2, 3, 1)
        else:
            h = x
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
                    keep: list[Tensor] | None, stream: int = 0, *, step: int = 0,
                    row0: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward, softmax cross-entropy (``N = n_global``), backward on one
        shard: (``tree_sum`` of the shard's per-row losses, 0-dim f32; grads).
        ``stream``, ``step``, ``row0``: unused (the masks come in ``keep``)."""
        logits, cache = self.forward(x.reshape(x.shape[0], -1), keep)
        lse, g = softmax_xent(logits, y, n_global)
        return tree_sum(lse, 0), self.backward(cache, g)

    def structure(self) -> dict[str, list[str] | dict[str, str]]:
        """Nothing frozen, tied or buffered in the spec's networks."""
        return {"frozen": [], "tied": {}, "buffers": []}

    def predict(self, x: Tensor) -> Tensor:
        """Logits without dropout."""
        return self.forward(x.reshape(x.shape[0], -1), None)[0]

    def loss_sum(self, logits: Tensor, y: Tensor) -> float:
        """``tree_sum`` of the per-row losses (spec section 7)."""
        return float(tree_sum(softmax_xent(logits, y, 1)[0], 0))
