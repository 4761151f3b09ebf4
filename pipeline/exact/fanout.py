"""A value's gradient from three or more consumers, summed in the spec's order
(docs/exact-spec.md, section 29), not autograd's.

autograd adds the gradients a value receives in the order its engine runs the
consumers' backward nodes; with three or more terms f32 addition is not
associative, so that order would decide bits (and it is the engine's, not a
specification). ``fix_fanout`` hooks the graph of one backward: every
consumer of such a value hands its gradient to a table and an exact zero to
autograd, and the value's node (or, for a leaf, the tensor's hook) replaces
the zeros' sum by ``tree_sum`` (section 5) over the gradients in consumer
order: the order in which the forward created the consuming operations
(autograd's sequence numbers count node creation on the thread, so they are
that order), an operation taking the value as several inputs once per input,
in argument order. A consumer that gives no gradient is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .context import trusted

__all__ = ["consumers", "fix_fanout", "ordered_sum"]

Edge = tuple[Any, int]  # (node, output number) of the value


def consumers(out: Tensor) -> dict[Edge, list[tuple[Any, int]]]:
    """For every value in the backward graph of ``out``, its consumers
    ``(node, input index)``."""
    uses: dict[Edge, list[tuple[Any, int]]] = {}
    if out.grad_fn is None:
        return uses
    seen, stack = {out.grad_fn}, [out.grad_fn]
    while stack:
        node = stack.pop()
        for i, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None:
                continue
            uses.setdefault((nxt, nr), []).append((node, i))
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return uses


def ordered_sum(terms: list[Tensor]) -> Tensor:
    """Section 5's neighbour-pairing tree over ``terms`` (f32, in order)."""
    while len(terms) > 1:
        pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        terms = pairs + ([terms[-1]] if len(terms) % 2 else [])
    return terms[0]


def fix_fanout(out: Tensor) -> list[Any]:
    """Hook the backward graph of ``out`` so that each value with three or
    more consumers gets the fixed-order sum (module docstring). Returns the
    handles of hooks placed on leaf tensors (the caller removes them after
    the backward); hooks on graph nodes die with the graph."""
    handles: list[Any] = []
    for (node, nr), users in consumers(out).items():
        if len(users) < 3:
            continue  # two terms: f32 + commutes (section 13)
        table: list[tuple[int, int, Tensor]] = []
        for user, index in users:
            user.register_hook(_make_post(table, user._sequence_nr(), index))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):  # a leaf: its hook sees the summed gradient
            handles.append(variable.register_hook(_make_leaf(table)))
        else:
            node.register_prehook(_make_pre(table, nr))
    return handles


def _make_post(table: list[tuple[int, int, Tensor]], seq: int, index: int
               ) -> Callable[..., Any]:
    def post(grad_inputs: tuple[Tensor | None, ...], _outs: tuple[Any, ...]) -> Any:
        g = grad_inputs[index]
        if g is None:
            return None
        table.append((seq, index, g))
        got = list(grad_inputs)
        with trusted():
            got[index] = torch.zeros((), dtype=g.dtype, device=g.device).expand_as(g)
        return tuple(got)
    return post


def _total(table: list[tuple[int, int, Tensor]], fallback: Tensor | None) -> Tensor | None:
    if not table:
        return fallback
    terms = [g for _, _, g in sorted(table, key=lambda t: (t[0], t[1]))]
    table.clear()
    with trusted():
        return ordered_sum(terms)


def _make_pre(table: list[tuple[int, int, Tensor]], nr: int) -> Callable[..., Any]:
    def pre(grad_outputs: tuple[Tensor | None, ...]) -> Any:
        got = list(grad_outputs)
        got[nr] = _total(table, got[nr])
        return tuple(got)
    return pre


def _make_leaf(table: list[tuple[int, int, Tensor]]) -> Callable[[Tensor], Tensor | None]:
    def leaf(g: Tensor) -> Tensor | None:
        return _total(table, g)
    return leaf
