"""The recorder of a model factory (docs/exact-spec.md, section 28): a
TorchFunctionMode that taints every tensor a non-exact op produces (or that
comes from a tainted input) and marks as spec-made the results of exact ops
on exact values; pipeline.exact.provenance holds the records and decides."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import math
from typing import Any

import numpy as np

from torch.overrides import TorchFunctionMode, resolve_name

from .guard import _MOVE, _NO_GRAD, _ROUTES, _tensors
from .provenance import clean, register_exact_constant, taint, taint_of

__all__ = ["recording"]


def _exact_names() -> frozenset[str]:
    arith = {n for n in _ROUTES if n.rpartition(".")[2].strip("_").removeprefix("r") in
             ("add", "sub", "mul", "multiply", "div", "truediv", "true_divide", "divide",
              "neg")}
    return frozenset((_MOVE | _NO_GRAD | arith) - {
        "torch.empty", "torch.Tensor.new_empty", "torch.empty_like"}) | {
        "torch.Tensor.__getitem__", "torch.Tensor.__setitem__", "torch.Tensor.copy_", "torch.eye",
        "torch.Tensor.fill_", "torch.Tensor.zero_"}


_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                     "__idiv__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                     "__ilshift__", "__irshift__", "__ifloordiv__", "__imod__", "__imatmul__"}


def _in_place(name: str) -> bool:
    """Whether the op ``name`` updates its first tensor argument: ``mul_``,
    ``__setitem__``, ``__iadd__``, ...; not metadata (``_version.__get__``)."""
    if name.endswith(".__get__") or name.endswith(".__set__"):
        return False
    last = name.rpartition(".")[2]
    return last in _IN_PLACE_DUNDERS or (last.endswith("_") and not last.startswith("_"))


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.exact = _exact_names()

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = resolve_name(func) or getattr(func, "__qualname__", repr(func))
        if name.endswith(".__get__"):  # metadata and aliases (.T, .data, ._base): no arithmetic
            return out
        inputs = [t for t in _tensors((args, kwargs))]
        why = next((w for w in map(taint_of, inputs) if w is not None), None)
        if why is None and name not in self.exact:
            why = name
        in_place = _in_place(name) or "out" in kwargs
        changed = [*_tensors(out), *(inputs[:1] if in_place else [])]
        if why is not None:
            for t in changed:
                taint(t, why)
        elif inputs and all(clean(t) for t in inputs) and _whole_numbers((args, kwargs)):
            # exact arithmetic of exact values. Not from data (torch.tensor of a
            # list or array: math.cos or NumPy may have made it) and not with a
            # fraction (0.1 may come from libm): those stay unknown.
            for t in changed:  # (an in-place op moved the version: recorded anew)
                root = t._base if t._base is not None else t
                if root.is_floating_point():
                    register_exact_constant(root)
        return out


def _whole_numbers(x: Any) -> bool:
    """Every Python or NumPy float among the arguments is a whole number (or
    infinite), and no NumPy array is among them."""
    if isinstance(x, (list, tuple)):
        return all(_whole_numbers(v) for v in x)
    if isinstance(x, dict):
        return all(_whole_numbers(v) for v in x.values())
    if isinstance(x, np.ndarray):
        return False
    if isinstance(x, (float, np.floating)):
        return not math.isfinite(x) or float(x).is_integer()
    return True


@contextmanager
def recording() -> Iterator[None]:
    """Watch a model factory: tensors it computes with non-exact ops are
    tainted (module docstring)."""
    with _Recorder():
        yield
