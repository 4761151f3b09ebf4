"""``from_torch``: a stock module tree converted to exact layers
(docs/exact-spec.md, sections 13-14), parameters copied: the same model, or
a refusal, never a different one.

Every ``torch.nn`` layer it knows becomes its exact twin; containers
(``Sequential``, ``ModuleList``, ``ModuleDict``) and a user's own module
classes keep their structure and forward code, with their children
converted (that code then runs under the guard, pipeline.exact.guard, which
routes its arithmetic and ``scaled_dot_product_attention`` to exact ops and
refuses the rest). What the stock tree says beyond its layers is kept:

- tied parameters stay one parameter (the exact layers share it);
- a frozen parameter (``requires_grad`` False) stays frozen;
- forward hooks and pre-hooks of a converted layer move to its exact twin
  (and run under the guard, like the forward code); those of kept modules
  stay;
- constant buffers (and tensor attributes) of a user's module stay, if their
  values are the same on every machine by construction (booleans, integers,
  floats that are whole numbers or infinities, tables from the exact helpers
  such as ``pipeline.exact.rotary_tables``; computed floats, e.g. a
  ``torch.cos`` table, and anything a recorded factory computed with a
  non-exact op are refused: pipeline.exact.provenance, spec section 28); one
  that forward updates is refused by LayerNet's check.

Refused, all at once (a ConfigError listing each module path, its type and
why): a layer with no exact version, a parametrization (weight_norm,
spectral_norm), a backward hook.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import ConfigError
from . import layers as L
from . import transformer as XT
from .guard import exact_function
from .provenance import constant_problem, is_exact_constant, register_exact_constant, \
    taint, taint_of

__all__ = ["from_torch", "SUPPORTED", "seed_free_values"]

# Data movement only: kept as they are.
_KEEP = (nn.Flatten, nn.Unflatten, nn.Identity)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _linear(m: nn.Linear) -> nn.Module | str:
    return L.Linear(m.in_features, m.out_features, m.bias is not None)


def _conv(m: nn.Conv1d | nn.Conv2d) -> nn.Module | str:
    """Conv1d/Conv2d: any stride, padding (numbers, "valid", an even "same"),
    dilation and groups (spec section 25); zero padding only."""
    if m.padding_mode != "zeros":
        return f"padding_mode {m.padding_mode!r}: exact mode pads with zeros only"
    if m.padding == "same" and any(d * (k - 1) % 2 for k, d in zip(m.kernel_size, m.dilation)):
        return "padding='same' pads unevenly here (one side more): give the padding as numbers"
    make = L.Conv1d if isinstance(m, nn.Conv1d) else L.Conv2d
    return make(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                m.bias is not None, m.dilation, m.groups)


def _batch_norm(m: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Module | str:
    """BatchNorm1d/2d (spec section 24), with the stock layer's running
    statistics and counter copied (the pipeline's initialisation then resets
    them as torch's constructor sets them)."""
    make = L.BatchNorm1d if isinstance(m, nn.BatchNorm1d) else L.BatchNorm2d
    new = make(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if m.track_running_stats:
        with torch.no_grad():
            new.running_mean.copy_(m.running_mean.detach().to(torch.float32))
            new.running_var.copy_(m.running_var.detach().to(torch.float32))
            new.num_batches_tracked.copy_(m.num_batches_tracked.detach())
    return new


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


def _softmax(m: nn.Softmax | nn.LogSoftmax) -> nn.Module | str:
    if m.dim is None:
        return ("dim is None (torch then picks a dim from the input's rank, a deprecated "
                "rule): give dim explicitly")
    return (L.Softmax if isinstance(m, nn.Softmax) else L.LogSoftmax)(m.dim)


def _rms_norm(m: nn.RMSNorm) -> nn.Module | str:
    return L.RMSNorm(tuple(m.normalized_shape), m.eps, m.elementwise_affine)


def _max_pool(m: nn.MaxPool2d) -> nn.Module | str:
    if m.dilation not in (1, (1, 1)) or m.ceil_mode or m.return_indices:
        return "dilation, ceil_mode and return_indices must be the defaults"
    return L.MaxPool2d(m.kernel_size, m.stride, m.padding)


def _avg_pool(m: nn.AvgPool2d) -> nn.Module | str:
    if m.ceil_mode:
        return "ceil_mode must be False"
    return L.AvgPool2d(m.kernel_size, m.stride, m.padding, m.count_include_pad,
                       m.divisor_override)


def _mha(m: nn.MultiheadAttention) -> nn.Module | str:
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        return "add_bias_kv and add_zero_attn must be False"
    if not 0.0 <= m.dropout < 1.0:
        return f"dropout must be in [0, 1), found {m.dropout}"
    return XT.MultiheadAttention(m.embed_dim, m.num_heads, m.dropout,
                                 m.in_proj_bias is not None, m.kdim, m.vdim, m.batch_first)


# torch.nn.functional's own tanh and sigmoid: Python wrappers of the tensor methods
# (no torch-function name of their own), the same functions as torch.tanh and torch.sigmoid.
_WRAPPERS = {torch.nn.functional.tanh: torch.tanh, torch.nn.functional.sigmoid: torch.sigmoid}


def _encoder_layer(m: nn.TransformerEncoderLayer) -> nn.Module | str:
    act = m.activation
    if not isinstance(act, nn.Module):  # a function: its exact implementation, guard or not
        act = exact_function(_WRAPPERS.get(act, act))
        if act is None:
            return (f"activation {getattr(m.activation, '__qualname__', m.activation)!r}: "
                    f"docs/exact-spec.md defines relu, gelu, silu, sigmoid and tanh")
    return XT.TransformerEncoderLayer(m.norm_first, act)


def _encoder(m: nn.TransformerEncoder) -> nn.Module | str:
    return XT.TransformerEncoder()


SUPPORTED: dict[type[nn.Module], Callable[..., nn.Module | str]] = {
    nn.Linear: _linear, nn.Conv2d: _conv, nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm, nn.GELU: _gelu, nn.ReLU: lambda m: L.ReLU(),
    nn.Dropout: _dropout, nn.SiLU: lambda m: L.SiLU(), nn.Sigmoid: lambda m: L.Sigmoid(),
    nn.Tanh: lambda m: L.Tanh(), nn.Softmax: _softmax, nn.LogSoftmax: _softmax,
    nn.RMSNorm: _rms_norm, nn.MaxPool2d: _max_pool, nn.AvgPool2d: _avg_pool,
    nn.AdaptiveAvgPool2d: lambda m: L.AdaptiveAvgPool2d(m.output_size),
    nn.Conv1d: _conv, nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm}
# Section 26: layers with children (converted in turn, under their own names).
SUPPORTED.update({
    nn.modules.linear.NonDynamicallyQuantizableLinear: _linear,  # MultiheadAttention.out_proj
    nn.MultiheadAttention: _mha, nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerEncoder: _encoder})
_ALIASES = (nn.modules.linear.NonDynamicallyQuantizableLinear,)  # not listed
_COMPOSITE = (XT.MultiheadAttention, XT.TransformerEncoderLayer, XT.TransformerEncoder)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
          "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _structural_problems(mod: nn.Module, label: str) -> list[str]:
    out = []
    if parametrize.is_parametrized(mod):
        out.append(f"{label}: parametrized ({', '.join(mod.parametrizations)}: weight_norm, "
                   f"spectral_norm or parametrize.register_parametrization); exact mode has no "
                   f"parametrizations: train the plain weight, or train in pinned mode")
    if getattr(mod, "_backward_hooks", None) or getattr(mod, "_backward_pre_hooks", None):
        out.append(f"{label}: a backward hook; exact mode's backward is the spec's alone: "
                   f"remove it, or train in pinned mode")
    return out


def _converted(mod: nn.Module, new: nn.Module, shared: dict[int, nn.Parameter]) -> nn.Module:
    """``new`` (``mod``'s exact twin) with ``mod``'s parameter values, frozen
    flags and tying (``shared``: the twin parameter of each stock one seen),
    and its forward hooks."""
    for name, p in mod.named_parameters(recurse=False):
        if p is None:
            continue
        if id(p) in shared:  # tied to a parameter converted before: the same one
            setattr(new, name, shared[id(p)])
            continue
        twin = getattr(new, name)
        with torch.no_grad():
            twin.copy_(p.detach().to(torch.float32))
        twin.requires_grad_(p.requires_grad)
        shared[id(p)] = twin
    for attr in _HOOKS:
        if hasattr(mod, attr):
            getattr(new, attr).update(getattr(mod, attr))
    return new


def _tensor_attributes(mod: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Tensors a module holds as plain attributes (neither parameters nor
    buffers): constants its forward captures."""
    return [(k, v) for k, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)]


def _carry_provenance(module: nn.Module, memo: dict[int, object]) -> None:
    """The deep copy's constants keep the originals' provenance (copies are
    new tensors: the records are by identity)."""
    for mod in module.modules():
        for _, t in [*mod.named_buffers(recurse=False), *_tensor_attributes(mod)]:
            twin = memo.get(id(t))
            if not isinstance(twin, torch.Tensor):
                continue
            if (why := taint_of(t)) is not None:
                taint(twin, why)
            elif is_exact_constant(t):
                register_exact_constant(twin)


def _convert(mod: nn.Module, path: str, problems: list[str],
             shared: dict[int, nn.Parameter]) -> nn.Module:
    """The exact version of ``mod`` (children converted in place on a copy)."""
    label = f"{path or '<model>'} ({type(mod).__module__}.{type(mod).__qualname__})"
    if found := _structural_problems(mod, label):
        problems += found
        return mod
    make = SUPPORTED.get(type(mod))
    if make is not None:
        new = make(mod)
        if isinstance(new, str):
            problems.append(f"{label}: {new}")
            return mod
        theirs = {n for n, _ in mod.named_parameters(recurse=False)}
        if odd := sorted(theirs - {n for n, _ in new.named_parameters(recurse=False)}):
            problems.append(f"{label}: parameters {odd} are not the layer's own (registered "
                            f"on it by hand?); exact mode trains the layer's weight and bias "
                            f"only: move them to a module of their own, or train in pinned "
                            f"mode")
            return mod
        new = _converted(mod, new, shared)
        for name, child in mod.named_children():  # section 26's composite layers
            setattr(new, name, _convert(child, f"{path}.{name}" if path else name, problems,
                                        shared))
        return new
    if isinstance(mod, L.EXACT_LAYERS) or isinstance(mod, _KEEP + _COMPOSITE):
        return mod
    stock = type(mod).__module__.startswith("torch.")
    if stock and not isinstance(mod, _CONTAINERS):
        problems.append(f"{label}: no exact version (supported: "
                        f"{', '.join(t.__name__ for t in SUPPORTED if t not in _ALIASES)}, "
                        f"Flatten, Unflatten, "
                        f"Identity, Sequential, ModuleList, ModuleDict)")
        return mod
    for name, p in mod.named_parameters(recurse=False):
        problems.append(f"{label}: parameter {name!r} {tuple(p.shape)} held by the module "
                        f"itself; exact mode initialises and trains only its layers' parameters")
    for name, buf in mod.named_buffers(recurse=False):
        if (why := constant_problem(buf)) is not None:
            problems.append(f"{label}: buffer {name!r} {why}")
    for name, val in _tensor_attributes(mod):  # captured constants (spec section 28)
        if (why := constant_problem(val)) is not None:
            problems.append(f"{label}: tensor attribute {name!r} {why}")
    for name, child in list(mod.named_children()):
        new = _convert(child, f"{path}.{name}" if path else name, problems, shared)
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
    memo: dict[int, object] = {}
    try:
        clone = copy.deepcopy(module, memo)
    except RuntimeError as e:  # torch's deepcopy refuses non-leaf parameters
        raise ConfigError("exact mode (from_torch)", [
            f"<model>: cannot be copied ({str(e).splitlines()[0][:160]}): the old "
            f"torch.nn.utils.weight_norm? exact mode has no parametrizations: train the "
            f"plain weight, or train in pinned mode"]) from None
    _carry_provenance(module, memo)
    out = _convert(clone, "", problems, {})
    if problems:
        raise ConfigError("exact mode (from_torch)", problems)
    return out


def seed_free_values(a: nn.Module, b: nn.Module, known: list[torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """Of two builds of one factory under different seeds, the parameters it
    set the same whatever the seed, which exact mode keeps as the factory set
    them (LayerNet); the others it drew from torch's generator, and exact mode
    draws from its own (spec section 16), the same on every machine. Kept
    only where the values are the same on every machine by construction: a
    fill (every element equal), or a tensor loaded with
    ``pipeline.pretrained`` (``known``: a file the manifest verifies). Any
    other seed-free value (a generator seeded inside the factory, a table
    computed with torch's kernels, a file read past the manifest) is refused."""
    kept, problems = {}, []
    others = dict(b.named_parameters())
    for name, p in a.named_parameters():
        q = others.get(name)
        if q is None or q.shape != p.shape or not torch.equal(p.detach(), q.detach()):
            continue  # drawn from the seed: the spec draws it
        v = p.detach().to(torch.float32)
        if v.numel() == 0 or bool((v == v.reshape(-1)[0]).all()) or any(
                k.shape == v.shape and torch.equal(k.to(torch.float32), v) for k in known):
            kept[name] = v.clone()
        else:
            problems.append(f"{name}: the factory sets it the same whatever the seed, but it "
                            f"is neither a constant nor loaded with pipeline.pretrained(), so "
                            f"exact mode cannot tell it is the same on every machine (torch's "
                            f"own draws and kernels are not): load pretrained weights with "
                            f"pipeline.pretrained(name) from a file in the data manifest, "
                            f"draw it from the seed, or train in pinned mode")
    if problems:
        raise ConfigError("exact mode (the factory's initial values)", problems)
    return kept
