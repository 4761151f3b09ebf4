"""Exact layers as ``nn.Module``s (docs/exact-spec.md, sections 14-16): write
an ordinary ``nn.Module`` from these, or convert a stock one with
``pipeline.exact.from_torch``. Parameters are f32; ``init_exact(model,
seed)`` sets every layer's parameters from the counter-based generator
(section 16), as the pipeline does before training.

Dropout and attention dropout draw their masks from the step context
(pipeline.exact.context.step_context) in training mode.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from ..core import rng
from . import activations as XA
from . import batchnorm as XB
from . import conv as XC
from . import functional as XF
from . import norms as XN
from . import pooling as XP
from . import reduce as XR
from .attention import attention
from .context import trusted

__all__ = ["Linear", "Conv2d", "Embedding", "LayerNorm", "GELU", "ReLU", "Dropout",
           "CausalSelfAttention", "SiLU", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "RMSNorm",
           "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "init_exact", "EXACT_LAYERS",
           "Conv1d", "BatchNorm1d", "BatchNorm2d"]


def _uniform(seed: int, layer: int, which: int, shape: tuple[int, ...], fan_in: int) -> Tensor:
    """Section 3's ``f32((u24 - 2^23) * 2^-23) * RN32(1/sqrt(fan_in))``, C order."""
    bound = np.float32(1.0 / math.sqrt(fan_in))
    u = rng.u24(rng.key(seed, rng.INIT, layer, which), 0, math.prod(shape))
    unit = (u - (1 << 23)).astype(np.float32) * np.float32(2.0**-23)
    return torch.from_numpy((unit * bound).reshape(shape))


def _normal(seed: int, layer: int, shape: tuple[int, ...]) -> Tensor:
    """Section 16's Irwin-Hall N(0, 1): ``RN32(sum of 12 u24 * 2^-24 - 6)``."""
    n = math.prod(shape)
    u = rng.u24(rng.key(seed, rng.INIT, layer, 0), 0, 12 * n).reshape(n, 12)
    total = u.sum(axis=1, dtype=np.int64).astype(np.float64)  # < 2^28: exact
    return torch.from_numpy((total * 2.0**-24 - 6.0).astype(np.float32).reshape(shape))


class Linear(nn.Module):
    """``x @ W^T + b`` over the last dim (spec section 14)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return XF.linear(x, self.weight, self.bias)

    def reset_exact(self, seed: int, layer: int) -> None:
        with torch.no_grad():
            self.weight.copy_(_uniform(seed, layer, 0, tuple(self.weight.shape), self.in_features))
            if self.bias is not None:
                self.bias.copy_(_uniform(seed, layer, 1, tuple(self.bias.shape), self.in_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class Conv2d(nn.Module):
    """2-D convolution: a stride, padding and dilation per dim, groups
    (spec sections 14 and 25)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 bias: bool = True, dilation: int | tuple[int, int] = 1,
                 groups: int = 1) -> None:
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels {in_channels} and out_channels "
                             f"{out_channels} must be divisible by groups {groups}")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return XC.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                         self.groups)

    def reset_exact(self, seed: int, layer: int) -> None:
        fan_in = math.prod(self.weight.shape[1:])  # (C / groups) * KH * KW, as torch
        with torch.no_grad():
            self.weight.copy_(_uniform(seed, layer, 0, tuple(self.weight.shape), fan_in))
            if self.bias is not None:
                self.bias.copy_(_uniform(seed, layer, 1, tuple(self.bias.shape), fan_in))


class Conv1d(Conv2d):
    """1-D convolution on ``(N, C, L)``: Conv2d on a height of one (spec
    section 25); the weight is ``(O, C / groups, K)`` as torch's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int],
                 stride: int | tuple[int] = 1, padding: int | tuple[int] | str = 0,
                 bias: bool = True, dilation: int | tuple[int] = 1, groups: int = 1) -> None:
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        super().__init__(in_channels, out_channels, (1, k), stride, padding, bias, dilation,
                         groups)
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, k))

    def forward(self, x: Tensor) -> Tensor:
        return XC.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                         self.groups)


class Embedding(nn.Module):
    """Rows of ``W (V, D)`` at integer indices (spec section 14)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim))

    def forward(self, idx: Tensor) -> Tensor:
        return XF.embedding(idx, self.weight)

    def reset_exact(self, seed: int, layer: int) -> None:
        with torch.no_grad():
            self.weight.copy_(_normal(seed, layer, tuple(self.weight.shape)))


class LayerNorm(nn.Module):
    """Normalisation over the last dim (spec section 14)."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine and bias else None

    def forward(self, x: Tensor) -> Tensor:
        return XF.layer_norm(x, self.weight, self.bias, self.eps)

    def reset_exact(self, seed: int, layer: int) -> None:
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()


class GELU(nn.Module):
    """GELU, erf form (``"none"``, torch's default) or tanh form."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return XF.gelu(x, self.approximate)


class ReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return XF.relu(x)


class Dropout(nn.Module):
    """Counter-based dropout (spec section 15); the identity in evaluation."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), found {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return XF.dropout(x, self.p, self.training)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as examples/charlm/model.py writes it
    (spec section 14): ``qkv`` Linear D -> 3D, causal attention with dropout
    ``p`` on the weights in training, ``proj`` Linear D -> D."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"CausalSelfAttention: d_model {d_model} is not a multiple of "
                             f"n_head {n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = Linear(d_model, 3 * d_model)
        self.proj = Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for z in self.qkv(x).split(d, dim=2))     # (B, H, T, D/H) each
        y = attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class SiLU(nn.Module):
    """``x * sigmoid(x)`` (spec section 20)."""

    def forward(self, x: Tensor) -> Tensor:
        return XA.silu(x)


class Sigmoid(nn.Module):
    """The logistic function (spec section 20)."""

    def forward(self, x: Tensor) -> Tensor:
        return XA.sigmoid(x)


class Tanh(nn.Module):
    """The hyperbolic tangent (spec section 20)."""

    def forward(self, x: Tensor) -> Tensor:
        return XA.tanh(x)


class Softmax(nn.Module):
    """Softmax along ``dim`` (spec section 21)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return XR.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    """Log-softmax along ``dim`` (spec section 21)."""

    def forward(self, x: Tensor) -> Tensor:
        return XR.log_softmax(x, self.dim)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last ``len(normalized_shape)``
    dims, with an optional weight (``torch.nn.RMSNorm``; spec section 22);
    ``eps`` None is float32's machine epsilon, as in torch."""

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float | None = None,
                 elementwise_affine: bool = True) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) \
            else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = nn.Parameter(torch.ones(shape)) if elementwise_affine else None

    def forward(self, x: Tensor) -> Tensor:
        return XN.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def reset_exact(self, seed: int, layer: int) -> None:
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, " \
               f"elementwise_affine={self.weight is not None}"


class MaxPool2d(nn.Module):
    """Max pooling, no dilation, floor mode (spec section 23)."""

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None
                 = None, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return XP.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(nn.Module):
    """Average pooling, floor mode (spec section 23)."""

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None
                 = None, padding: int | tuple[int, int] = 0, count_include_pad: bool = True,
                 divisor_override: int | None = None) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return XP.avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                             self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool2d(nn.Module):
    """Adaptive average pooling to ``output_size`` (spec section 23)."""

    def __init__(self, output_size: int | tuple[int | None, int | None]) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return XP.adaptive_avg_pool2d(x, self.output_size)


class _BatchNorm(nn.Module):
    """Batch normalisation over dim 1 (spec section 24), torch's parameters
    and buffers under torch's names: in training the batch's statistics (in
    the pipeline: the shard's rows) and, with ``track_running_stats``, the
    running statistics moved by ``momentum`` (None: the cumulative average);
    in evaluation the running statistics."""

    _dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x: Tensor) -> Tensor:
        with trusted():  # the layer's own code: the spec's (section 24)
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if x.dim() not in self._dims:
            dims = " or ".join(map(str, self._dims))
            raise ValueError(f"{type(self).__name__}: expected a {dims}-dim input, found "
                             f"{x.dim()} dims")
        factor = self.momentum
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # the cumulative average
                    factor = 1.0 / float(self.num_batches_tracked)
        batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return XB.batch_norm(x, self.running_mean if track else None,
                             self.running_var if track else None, self.weight, self.bias,
                             batch, factor, self.eps)

    def reset_exact(self, seed: int, layer: int) -> None:
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
                self.bias.zero_()
            if self.running_mean is not None:
                self.running_mean.zero_()
                self.running_var.fill_(1.0)
                self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """``nn.BatchNorm1d`` on ``(N, C)`` or ``(N, C, L)`` (spec section 24)."""

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """``nn.BatchNorm2d`` on ``(N, C, H, W)`` (spec section 24)."""

    _dims = (4,)


EXACT_LAYERS = (Linear, Conv2d, Embedding, LayerNorm, GELU, ReLU, Dropout, CausalSelfAttention,
                SiLU, Sigmoid, Tanh, Softmax, LogSoftmax, RMSNorm, MaxPool2d, AvgPool2d,
                AdaptiveAvgPool2d, Conv1d, BatchNorm1d, BatchNorm2d)


def init_exact(model: nn.Module, seed: int) -> nn.Module:
    """Set every exact layer's parameters from ``seed`` (spec section 16):
    layers with parameters numbered in ``named_modules()`` order; a parameter
    tied to an earlier layer's keeps that layer's draw (section 29, as
    torch's ``head.weight = tok.weight`` keeps the embedding's). Returns
    ``model``."""
    layer = 0
    seen: set[int] = set()  # a tied parameter is drawn once, by its first layer (section 29)
    for _, mod in model.named_modules():
        reset = getattr(mod, "reset_exact", None)
        own = list(mod.parameters(recurse=False))
        if reset is not None and own:
            keep = [(p, p.detach().clone()) for p in own if id(p) in seen]
            reset(seed, layer)
            with torch.no_grad():
                for p, value in keep:
                    p.copy_(value)
            seen.update(id(p) for p in own)
            layer += 1
    return model
