"""The guard: a network's own forward code (``x + f(x)``, ``split``,
``F.scaled_dot_product_attention``, ...) runs only what docs/exact-spec.md
defines (section 13).

``Guard`` is a ``TorchFunctionMode``. Inside an exact layer (a trusted region,
pipeline.exact.context) every call passes. Elsewhere a call is
- data movement or metadata: passed (basic indexing only, and broadcasting
  views or selects only without a gradient);
- arithmetic or a functional layer: routed to its exact version
  (pipeline.exact.arith, functional, attention);
- anything else (reductions, matmul, exp, in-place updates, ...): refused.
``check_graph`` then checks the backward graph itself: every node's backward
is exact data movement or an exact layer's (a value with three or more
consumers gets section 29's fixed-order sum: pipeline.exact.fanout). ``check_module`` runs both over one forward in training and one in
evaluation, naming the module path of each refused call.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, resolve_name

from ..core.errors import ConfigError
from . import activations as XA
from . import batchnorm as XB
from . import conv as XC
from . import arith
from . import functional as XF
from . import norms as XN
from . import pooling as XP
from . import reduce as XR
from . import trig as XT
from .attention import _Attention, attention
from .context import is_trusted, step_context, trusted

__all__ = ["Guard", "check_graph", "check_module", "EXACT_NODES", "EXACT_FUNCTIONS"]

_T = "torch.Tensor."
_META = {f"{_T}{n}.__get__" for n in (
    "shape", "device", "dtype", "ndim", "requires_grad", "is_cuda", "T", "mT", "data",
    "is_leaf", "grad_fn", "layout", "names")}
_MOVE = {*_META, *(f"{_T}{n}" for n in (
    "size", "dim", "numel", "__len__", "__iter__", "__format__", "__repr__", "view", "reshape",
    "view_as", "reshape_as", "flatten", "unflatten", "transpose", "t", "permute", "contiguous",
    "split", "split_with_sizes", "chunk", "unbind", "squeeze", "unsqueeze", "narrow", "select",
    "clone", "detach", "float", "double", "long", "int", "bool", "to", "type_as", "new_zeros",
    "new_ones", "new_full", "new_empty", "is_floating_point", "is_contiguous", "stride",
    "element_size", "item", "tolist", "cpu", "cuda", "movedim", "swapaxes")),
    *(f"torch.{n}" for n in (
        "reshape", "flatten", "transpose", "permute", "split", "chunk", "unbind", "squeeze",
        "unsqueeze", "narrow", "select", "cat", "concat", "concatenate", "stack", "clone",
        "arange", "zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like",
        "empty_like", "tensor", "as_tensor", "movedim", "swapaxes", "numel", "is_tensor"))}
# Exact in the forward, but their backward would reduce or scatter: only
# without a gradient.
_NO_GRAD = {*(f"{_T}{n}" for n in (
    "expand", "expand_as", "repeat", "broadcast_to", "masked_fill", "where", "__eq__", "__ne__",
    "__lt__", "__le__", "__gt__", "__ge__", "eq", "ne", "lt", "le", "gt", "ge", "__and__",
    "__or__", "__invert__", "logical_not", "logical_and", "logical_or", "tril", "triu",
    "abs", "maximum", "minimum", "argmax", "argmin")),
    *(f"torch.{n}" for n in ("where", "tril", "triu", "broadcast_to", "eq", "ne", "lt", "le",
                             "gt", "ge", "logical_not", "logical_and", "logical_or",
                             "maximum", "minimum", "argmax", "abs"))}


def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Any = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
          enable_gqa: bool = False) -> Tensor:
    if enable_gqa:
        raise ValueError("scaled_dot_product_attention: exact mode supports enable_gqa=False")
    return attention(query, key, value, causal=bool(is_causal), dropout_p=float(dropout_p),
                     scale=scale, attn_mask=attn_mask)


def _gelu(input: Tensor, approximate: str = "none") -> Tensor:
    return XF.gelu(input, approximate)


def _relu(input: Tensor, inplace: bool = False) -> Tensor:
    return XF.relu(input)


def _dropout(input: Tensor, p: float = 0.5, training: bool = True,
             inplace: bool = False) -> Tensor:
    return XF.dropout(input, float(p), bool(training))


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return XF.linear(input, weight, bias)


def _layer_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    if tuple(normalized_shape) != tuple(input.shape[-1:]):
        raise ValueError(f"layer_norm: exact mode normalises over the last dim only, found "
                         f"normalized_shape {tuple(normalized_shape)}")
    return XF.layer_norm(input, weight, bias, eps)


def _embedding(input: Tensor, weight: Tensor, padding_idx: Any = None, max_norm: Any = None,
               norm_type: float = 2.0, scale_grad_by_freq: bool = False,
               sparse: bool = False) -> Tensor:
    if padding_idx is not None or max_norm is not None or scale_grad_by_freq or sparse:
        raise ValueError("embedding: exact mode supports no padding_idx, max_norm, "
                         "scale_grad_by_freq or sparse")
    return XF.embedding(input, weight)


def _silu(input: Tensor, inplace: bool = False) -> Tensor:
    return XA.silu(input)


def _rms_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
              eps: float | None = None) -> Tensor:
    return XN.rms_norm(input, normalized_shape, weight, eps)


def _softmax(log: bool) -> Any:
    f = XR.log_softmax if log else XR.softmax

    def route(input: Tensor, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> Tensor:
        return f(input, dim, dtype)
    return route


def _reduction(mean: bool) -> Any:
    f = XR.xmean if mean else XR.xsum

    def route(input: Tensor, dim: Any = None, keepdim: bool = False, *,
              dtype: Any = None) -> Tensor:
        if not input.is_floating_point() and not mean:  # integers: exact in any order
            with trusted():
                return input.sum(dim, keepdim, dtype=dtype) if dim is not None else \
                    input.sum(dtype=dtype)
        return f(input, dim, keepdim, dtype=dtype)
    return route


def _max_pool2d(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
                dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> Tensor:
    if XP.pair(dilation, "dilation") != (1, 1) or ceil_mode or return_indices:
        raise ValueError("max_pool2d: exact mode supports no dilation, ceil_mode or "
                         "return_indices")
    return XP.max_pool2d(input, kernel_size, stride, padding)


def _avg_pool2d(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
                ceil_mode: bool = False, count_include_pad: bool = True,
                divisor_override: Any = None) -> Tensor:
    if ceil_mode:
        raise ValueError("avg_pool2d: exact mode supports no ceil_mode")
    return XP.avg_pool2d(input, kernel_size, stride, padding, count_include_pad,
                         divisor_override)


def _batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None,
                training: bool = False, momentum: float | None = 0.1,
                eps: float = 1e-5) -> Tensor:
    return XB.batch_norm(input, running_mean, running_var, weight, bias, bool(training),
                         momentum, eps)


def _var(input: Tensor, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *,
         correction: Any = None) -> Tensor:
    if isinstance(dim, bool):  # torch.var(x, unbiased)
        dim, unbiased = None, dim
    if correction is None:
        correction = 0 if unbiased is False else 1
    elif unbiased is not None:
        raise ValueError("var: give unbiased or correction, not both")
    return XB.xvar(input, dim, correction=correction, keepdim=keepdim)


def _conv_route(f: Any) -> Any:
    def route(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
              padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
        return f(input, weight, bias, stride, padding, dilation, groups)
    return route


def _no_alpha(f: Any, swap: bool = False) -> Any:
    def route(a: Any, b: Any, *, alpha: Any = 1, rounding_mode: Any = None) -> Tensor:
        if alpha != 1 or rounding_mode is not None:
            raise ValueError("exact arithmetic: alpha and rounding_mode are not supported")
        return f(b, a) if swap else f(a, b)
    return route


_ROUTES: dict[str, Any] = {
    "torch.nn.functional.scaled_dot_product_attention": _sdpa,
    "torch.nn.functional.gelu": _gelu, "torch.nn.functional.relu": _relu,
    "torch.relu": _relu, f"{_T}relu": _relu, "torch.nn.functional.dropout": _dropout,
    "torch.nn.functional.linear": _linear, "torch.nn.functional.layer_norm": _layer_norm,
    "torch.nn.functional.embedding": _embedding,
    f"{_T}__rsub__": _no_alpha(arith.sub, swap=True),
    f"{_T}__rtruediv__": _no_alpha(arith.div, swap=True),
    f"{_T}neg": arith.neg, f"{_T}__neg__": arith.neg, "torch.neg": arith.neg,
    "torch.nn.functional.silu": _silu, "torch.nn.functional.rms_norm": _rms_norm,
    "torch.nn.functional.max_pool2d": _max_pool2d, "torch.max_pool2d": _max_pool2d,
    "torch.nn.functional.avg_pool2d": _avg_pool2d,
    "torch.nn.functional.adaptive_avg_pool2d": XP.adaptive_avg_pool2d}
# Spec sections 24-25: batch normalisation, variance, Conv1d/Conv2d.
_ROUTES["torch.nn.functional.batch_norm"] = _batch_norm
_ROUTES["torch.var"] = _ROUTES[f"{_T}var"] = _var
for _n, _f in (("conv1d", XC.conv1d), ("conv2d", XC.conv2d)):
    _ROUTES[f"torch.nn.functional.{_n}"] = _ROUTES[f"torch.{_n}"] = _conv_route(_f)
for _n in ("torch.sigmoid", f"{_T}sigmoid", "torch.special.expit"):
    _ROUTES[_n] = XA.sigmoid
for _n in ("torch.tanh", f"{_T}tanh"):
    _ROUTES[_n] = XA.tanh
for _n, _f in (("sin", XT.sin), ("cos", XT.cos)):  # spec section 28
    _ROUTES[f"torch.{_n}"] = _ROUTES[f"{_T}{_n}"] = _f
for _n, _log in (("softmax", False), ("log_softmax", True)):
    for _p in ("torch.nn.functional.", "torch.", _T, "torch.special."):
        _ROUTES[f"{_p}{_n}"] = _softmax(_log)
for _n, _mean in (("sum", False), ("mean", True)):
    _ROUTES[f"torch.{_n}"] = _ROUTES[f"{_T}{_n}"] = _reduction(_mean)
for _names, _f in ((("add", "__add__", "__radd__"), arith.add), (("sub", "__sub__"), arith.sub),
                   (("mul", "__mul__", "__rmul__", "multiply"), arith.mul),
                   (("div", "__truediv__", "true_divide", "divide"), arith.div)):
    for _n in _names:
        _ROUTES[f"{_T}{_n}"] = _ROUTES[f"torch.{_n}"] = _no_alpha(_f)


def _tensors(x: Any) -> Iterator[Tensor]:
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _needs_grad(args: Any) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args))


def _basic_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in items)


_NAMES: dict[Any, str] = {}  # resolve_name's answers (it costs a warnings filter per call)


def _name(func: Any) -> str:
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        name = resolve_name(func) or getattr(func, "__qualname__", repr(func))
    try:
        if len(_NAMES) < 4096:
            _NAMES[func] = name
    except TypeError:  # unhashable: not kept
        pass
    return name


def exact_function(func: Any) -> Any | None:
    """The exact implementation the guard routes the torch function ``func``
    to (``F.gelu`` -> the spec's GELU), or None if it routes none: a converted
    module that keeps a function (a TransformerEncoderLayer's activation)
    calls this one, so it gives the spec's bits with or without a guard."""
    return _ROUTES.get(_name(func))


class Guard(TorchFunctionMode):
    """Route or refuse every torch call outside exact layers (module docstring).
    ``found`` (a list) collects refusals instead of raising, with the module
    path from ``where`` (a stack kept by ``check_module``)."""

    def __init__(self, found: list[str] | None = None, where: list[str] | None = None) -> None:
        super().__init__()
        self.found, self.where = found, where

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if is_trusted():
            return func(*args, **kwargs)
        name = _name(func)
        route = _ROUTES.get(name)
        if route is not None:
            return route(*args, **kwargs)
        if name in _MOVE:
            return func(*args, **kwargs)
        if name == f"{_T}__getitem__" and (_basic_index(args[1]) or not _needs_grad(args)):
            return func(*args, **kwargs)
        if name in _NO_GRAD and not _needs_grad((args, kwargs)):
            return func(*args, **kwargs)
        why = (f"calls {name}, which docs/exact-spec.md does not define"
               + (" with a gradient" if name in _NO_GRAD or name.endswith("__getitem__") else ""))
        if self.found is None:
            raise ConfigError("exact mode", [why])
        self.found.append(f"{self.where[-1] if self.where else '<model>'}: {why}")
        return func(*args, **kwargs)


# Backward nodes whose arithmetic is the spec's: the exact layers' Functions
# and data movement (their backward moves data or converts dtype back).
# torch's own (C++) backward nodes that move data exactly, by name; a Python
# autograd.Function's node is never taken by its name, only by its class.
EXACT_NODES = frozenset({
    "AccumulateGrad", "View", "ReshapeAlias", "UnsafeView", "Transpose", "T",
    "Permute", "Split", "SplitWithSizes", "UnsafeSplit", "UnsafeSplitWithSizes", "Cat", "Stack",
    "Select", "Slice", "Unbind", "Squeeze", "Unsqueeze", "Clone", "ToCopy", "Alias"})
# The exact layers' own autograd Functions (spec sections 12-18), by identity.
EXACT_FUNCTIONS: frozenset[type] = frozenset({
    XF._Linear, XF._Conv2d, XF._Embedding, XF._LayerNorm, XF._GELU, XF._Select,
    arith._Binary, _Attention, XA._Activation, XR._Sum, XR._Softmax, XN._RMSNorm,
    XP._MaxPool, XP._AvgPool, XP._AdaptiveAvg, XB._BatchNorm, XB._Var, XC._ConvNd}) | {XT._SinCos}


def check_graph(out: Tensor) -> list[str]:
    """Problems with the backward graph of ``out`` (empty: it is exact)."""
    if out.grad_fn is None:
        return []
    problems = []
    seen, stack = {out.grad_fn}, [out.grad_fn]
    while stack:
        node = stack.pop()
        fwd = getattr(node, "_forward_cls", None)  # set on a Python Function's nodes only
        kind = re.sub(r"Backward\d*$", "", type(node).__name__)
        if (fwd not in EXACT_FUNCTIONS) if fwd is not None else (kind not in EXACT_NODES):
            problems.append(f"the backward of {type(node).__name__} is not defined by "
                            f"docs/exact-spec.md")
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return sorted(set(problems))


def check_module(module: nn.Module, sample: Tensor) -> None:
    """One forward of ``sample`` in training mode (a step context; gradients
    on) and one in evaluation under the guard, collecting every refused call
    by module path, and the training graph's problems: ConfigError listing
    all of them, or nothing."""
    found: list[str] = []
    where: list[str] = []
    hooks = []
    for path, mod in module.named_modules():
        label = f"{path or '<model>'} ({type(mod).__name__})"
        hooks.append(mod.register_forward_pre_hook(
            lambda m, a, label=label: where.append(label)))  # returns None: inputs kept
        hooks.append(mod.register_forward_hook(lambda m, a, o: where.pop() and None))
    was_training = module.training
    graph: list[str] = []
    try:
        module.train()
        with torch.enable_grad(), step_context(0, 0, 0), Guard(found, where):
            out = module(sample)
        graph = check_graph(out) if isinstance(out, Tensor) else []
        module.eval()
        with torch.no_grad(), Guard(found, where):
            module(sample)
    except Exception as e:  # noqa: BLE001 - user code; report what was found before it
        if not found:
            raise
        found.append(f"{where[-1] if where else '<model>'}: then the forward failed: "
                     f"{type(e).__name__}: {e}")
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    problems = sorted(set(found)) + graph
    if problems:
        raise ConfigError("exact mode (the model's forward)", problems)
