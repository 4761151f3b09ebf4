"""Elementwise arithmetic with a specified backward (docs/exact-spec.md,
section 13): ``+ - * /`` and negation with broadcasting, where the gradient
of a broadcast operand is reduced by ``tree_sum`` (torch's own backward
would reduce with a float ``sum`` whose order is not fixed, and its formulas
for ``*`` and ``/`` may change between versions). The guard routes a
network's own ``+ - * /`` here; the layers call them directly.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from .context import trusted
from .context import trusted_backward as _trusted_backward
from .flat import rn32
from .ops import tree_sum

__all__ = ["add", "sub", "mul", "div", "neg", "sum_to"]

Operand = Tensor | int | float


def sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    """``g`` reduced to ``shape`` (spec section 13, ``sum_to``): the extra
    leading dims flattened into one and tree-summed, then each broadcast
    size-1 dim tree-summed in increasing order."""
    if g.shape == shape:
        return g
    extra = g.dim() - len(shape)
    if extra > 0:
        g = tree_sum(g.reshape(-1, *g.shape[extra:]), 0)
    for d, size in enumerate(shape):
        if size == 1 and g.shape[d] != 1:
            g = tree_sum(g, d).unsqueeze(d)
    return g


def _operands(a: Operand, b: Operand, what: str) -> tuple[Tensor, Tensor]:
    """Both operands as tensors of one dtype on one device: a Python number
    takes the tensor's dtype (``RN32`` for f32); an integer tensor meeting a
    float tensor is converted to its dtype; two float dtypes must agree."""
    ta, tb = isinstance(a, Tensor), isinstance(b, Tensor)
    if not (ta or tb):
        raise TypeError(f"exact {what}: expected a tensor operand")
    like = a if ta else b
    assert isinstance(like, Tensor)

    def conv(v: Operand) -> Tensor:
        if isinstance(v, Tensor):
            if v.dtype == like.dtype:
                return v
            if v.is_floating_point() and like.is_floating_point():
                raise TypeError(f"exact {what}: operands of two float dtypes, {v.dtype} and "
                                f"{like.dtype}; convert one first")
            return v.to(like.dtype) if like.is_floating_point() else v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"exact {what}: expected a tensor or a number, found {type(v)}")
        val: float | int = rn32(float(v)) if like.dtype == torch.float32 else v
        return torch.full((), val, dtype=like.dtype, device=like.device)

    x, y = conv(a), conv(b)
    if x.is_floating_point() != y.is_floating_point():   # a float meets an int tensor
        x, y = (x, y.to(x.dtype)) if x.is_floating_point() else (x.to(y.dtype), y)
    return x, y


class _Binary(Function):
    @staticmethod
    def forward(ctx: Any, op: str, a: Tensor, b: Tensor) -> Tensor:
        y = _FORWARD[op](a, b)
        ctx.op, ctx.shapes = op, (a.shape, b.shape)
        ctx.save_for_backward(a, b, y if op == "div" else None)
        return y

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        a, b, y = ctx.saved_tensors
        op = ctx.op
        if op == "add":
            ga, gb = g, g
        elif op == "sub":
            ga, gb = g, -g
        elif op == "mul":
            ga, gb = g * b, g * a
        else:  # div: ga = g / b, gb = -(ga * y)
            ga = g / b
            gb = -(ga * y)
        need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        return (None, sum_to(ga, ctx.shapes[0]) if need_a else None,
                sum_to(gb, ctx.shapes[1]) if need_b else None)


_FORWARD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}


def _binary(op: str, a: Operand, b: Operand) -> Tensor:
    x, y = _operands(a, b, op)
    with trusted():
        if not x.is_floating_point():  # integer arithmetic: exact, no gradient
            if op == "div":
                raise TypeError("exact div: integer division is not supported; convert to float")
            return _FORWARD[op](x, y)
        return _Binary.apply(op, x, y)


def add(a: Operand, b: Operand) -> Tensor:
    """``a + b`` elementwise with broadcasting (spec section 13)."""
    return _binary("add", a, b)


def sub(a: Operand, b: Operand) -> Tensor:
    """``a - b`` elementwise with broadcasting."""
    return _binary("sub", a, b)


def mul(a: Operand, b: Operand) -> Tensor:
    """``a * b`` elementwise with broadcasting."""
    return _binary("mul", a, b)


def div(a: Operand, b: Operand) -> Tensor:
    """``a / b`` elementwise with broadcasting, correctly rounded (the divisor
    is a tensor on the operand's device, never a host scalar)."""
    return _binary("div", a, b)


def neg(a: Tensor) -> Tensor:
    """``-a`` (exact); its gradient is ``-g``."""
    return _binary("mul", a, -1) if a.is_floating_point() else -a
