"""``from_torch``: a stock module tree converted to exact layers
(docs/exact-spec.md, sections 13-14), parameters copied.

Every ``torch.nn`` layer it knows becomes its exact twin; containers
(``Sequential``, ``ModuleList``, ``ModuleDict``) and a user's own module
classes keep their structure and forward code, with their children
converted (that code then runs under the guard, pipeline.exact.guard, which
routes its arithmetic and ``scaled_dot_product_attention`` to exact ops and
refuses the rest). Everything else is refused, all at once: a ConfigError
listing each unsupported module path, its type and why.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..core.errors import ConfigError
from . import layers as L

__all__ = ["from_torch", "SUPPORTED"]

# Data movement only: kept as they are.
_KEEP = (nn.Flatten, nn.Unflatten, nn.Identity)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _linear(m: nn.Linear) -> nn.Module | str:
    return L.Linear(m.in_features, m.out_features, m.bias is not None)


def _conv2d(m: nn.Conv2d) -> nn.Module | str:
    stride, pad = m.stride, m.padding
    if isinstance(pad, str) or len(set(stride)) != 1 or len(set(pad)) != 1:
        return "stride and padding must be one integer for both dims"
    if m.dilation != (1, 1) or m.groups != 1 or m.padding_mode != "zeros":
        return "dilation, groups and padding_mode must be the defaults"
    return L.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride[0], pad[0],
                    m.bias is not None)


def _embedding(m: nn.Embedding) -> nn.Module | str:
    if m.padding_idx is not None or m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
        return "padding_idx, max_norm, scale_grad_by_freq and sparse must be the defaults"
    return L.Embedding(m.num_embeddings, m.embedding_dim)


def _layer_norm(m: nn.LayerNorm) -> nn.Module | str:
    if len(m.normalized_shape) != 1:
        return f"normalized_shape must be one dim (the last), found {m.normalized_shape}"
    return L.LayerNorm(m.normalized_shape[0], m.eps, m.elementwise_affine,
                       m.bias is not None if m.elementwise_affine else False)


def _gelu(m: nn.GELU) -> nn.Module | str:
    return L.GELU(m.approximate)


def _dropout(m: nn.Dropout) -> nn.Module | str:
    return L.Dropout(m.p)


SUPPORTED: dict[type[nn.Module], Callable[..., nn.Module | str]] = {
    nn.Linear: _linear, nn.Conv2d: _conv2d, nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm, nn.GELU: _gelu, nn.ReLU: lambda m: L.ReLU(),
    nn.Dropout: _dropout}


def _convert(mod: nn.Module, path: str, problems: list[str]) -> nn.Module:
    """The exact version of ``mod`` (children converted in place on a copy)."""
    label = f"{path or '<model>'} ({type(mod).__module__}.{type(mod).__qualname__})"
    make = SUPPORTED.get(type(mod))
    if make is not None:
        new = make(mod)
        if isinstance(new, str):
            problems.append(f"{label}: {new}")
            return mod
        with torch.no_grad():
            for name, p in mod.named_parameters(recurse=False):
                if p is not None:
                    getattr(new, name).copy_(p.detach().to(torch.float32))
        return new
    if isinstance(mod, L.EXACT_LAYERS) or isinstance(mod, _KEEP):
        return mod
    stock = type(mod).__module__.startswith("torch.")
    if stock and not isinstance(mod, _CONTAINERS):
        problems.append(f"{label}: no exact version (supported: "
                        f"{', '.join(t.__name__ for t in SUPPORTED)}, Flatten, Unflatten, "
                        f"Identity, Sequential, ModuleList, ModuleDict)")
        return mod
    for name, p in mod.named_parameters(recurse=False):
        problems.append(f"{label}: parameter {name!r} {tuple(p.shape)} held by the module "
                        f"itself; exact mode initialises and trains only its layers' parameters")
    for name, _ in mod.named_buffers(recurse=False):
        problems.append(f"{label}: buffer {name!r}: exact layers keep no training-time state")
    for name, child in list(mod.named_children()):
        new = _convert(child, f"{path}.{name}" if path else name, problems)
        if new is not child:
            setattr(mod, name, new)
    return mod


def from_torch(module: nn.Module) -> nn.Module:
    """A converted copy of ``module`` (the argument is left as it is): known
    layers replaced by exact ones with their parameters copied (as f32),
    containers and user modules kept with converted children. Raises
    ConfigError listing every unsupported module (path, type, why)."""
    if not isinstance(module, nn.Module):
        raise ConfigError("from_torch", [f"expected a torch.nn.Module, found "
                                         f"{type(module).__name__}"])
    problems: list[str] = []
    out = _convert(copy.deepcopy(module), "", problems)
    if problems:
        raise ConfigError("exact mode (from_torch)", problems)
    return out
