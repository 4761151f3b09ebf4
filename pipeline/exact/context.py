"""The context exact layers run in: the dropout masks of a training step
(docs/exact-spec.md, section 15) and the trusted regions of the guard.

A training step's forward runs inside ``step_context(seed, step, row0)``:
each dropout application in training mode takes the next site number, and
its mask is ``u24(key(seed, MASK, step, site), g * F + j) >= T`` for global
row ``g = row0 + n`` and element ``j`` of that row. The indices of a shard
are one contiguous range, so a shard's mask is one counter-based draw, and
it is the same whichever shard, rank or world size computes it.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core import rng
from .flat import rn32

__all__ = ["step_context", "next_mask", "dropout_constants", "StepContext", "trusted",
           "is_trusted", "weight_cache", "cached", "apply_trusted", "trusted_backward"]


@dataclass
class StepContext:
    """Where the masks of one shard's forward come from."""

    seed: int
    step: int
    row0: int
    site: int = 0


_LOCAL = threading.local()


@contextmanager
def step_context(seed: int, step: int, row0: int) -> Iterator[StepContext]:
    """Dropout in training mode inside this block draws the masks of global
    step ``step`` for rows starting at global row ``row0``; sites count from
    0. Nests (the inner context wins) and is per thread."""
    ctx = StepContext(seed, step, row0)
    outer = getattr(_LOCAL, "ctx", None)
    _LOCAL.ctx = ctx
    try:
        yield ctx
    finally:
        _LOCAL.ctx = outer


def dropout_constants(rate: float) -> tuple[int, float]:
    """``(T, scale)``: keep iff ``u24 >= T``; kept values times ``scale``
    (spec section 6: ``T = floor(q 2^24 + 0.5)``, ``scale = RN32(1/(1-q))``)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate: expected a number in [0, 1), found {rate!r}")
    return int(math.floor(rate * 2.0**24 + 0.5)), rn32(1.0 / (1.0 - rate))


def next_mask(shape: tuple[int, ...], rate: float, device: torch.device) -> Tensor | None:
    """The keep mask (bool, ``shape``, on ``device``) of the next dropout site
    of the current step context; rows are ``shape[0]``. Rate 0 draws no mask
    and takes no site number: None (the identity)."""
    ctx: StepContext | None = getattr(_LOCAL, "ctx", None)
    if ctx is None and rate != 0.0:
        raise RuntimeError(
            "exact dropout in training mode needs a step context: run the forward inside "
            "pipeline.exact.step_context(seed, step, row0) (the pipeline does), or call "
            "module.eval()")
    if rate == 0.0:
        return None
    site = ctx.site
    ctx.site += 1
    rows, per_row = shape[0], math.prod(shape[1:])
    threshold, _ = dropout_constants(rate)
    k = rng.key(ctx.seed, rng.MASK, ctx.step, site)
    z = rng.outputs(k, ctx.row0 * per_row, rows * per_row)
    keep = np.right_shift(z, np.uint64(40), out=z) >= np.uint64(threshold)
    return torch.from_numpy(keep.reshape(shape)).to(device)


@contextmanager
def trusted() -> Iterator[None]:
    """Inside an exact layer's own forward or backward: the guard
    (pipeline.exact.guard) lets every torch call through, since the layer's
    code is the spec's arithmetic."""
    _LOCAL.trusted = getattr(_LOCAL, "trusted", 0) + 1
    try:
        # Skip torch-function dispatch altogether (modes and subclasses) while
        # inside: the guard would pass every call anyway, at a Python call
        # per op (measured: about a fifth of a shard's forward).
        with torch._C.DisableTorchFunction():
            yield
    finally:
        _LOCAL.trusted -= 1


def is_trusted() -> bool:
    return getattr(_LOCAL, "trusted", 0) > 0


def apply_trusted(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)`` as a trusted region of the guard."""
    with trusted():
        return fn.apply(*args)


def apply_f32(fn: type[torch.autograd.Function], what: str, x: Any, *args: Any) -> Any:
    """``apply_trusted(fn, x, *args)`` for an elementwise function of an f32
    tensor ``x``; anything else is a TypeError naming ``what``."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"exact {what}: expected a float32 tensor, found "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    return apply_trusted(fn, x, *args)


def trusted_backward(f: Callable[..., Any]) -> Callable[..., Any]:
    """A Function's backward run as a trusted region (for a backward called
    while a guard is active) and once differentiable: its exact ops record
    no graph, so under ``create_graph=True`` the gradients are still
    computed, and differentiating them again raises torch's clear error."""
    @functools.wraps(f)
    def wrapper(*args: Any) -> Any:
        with trusted():
            return f(*args)
    return once_differentiable(wrapper)


@contextmanager
def weight_cache(cache: dict[tuple[int, str], tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Inside this block, ``cached`` keeps derived tensors (quantised weights)
    in ``cache``; its owner clears it whenever a parameter may have changed
    (pipeline.exact.modnet: on any change of the parameters' versions)."""
    outer = getattr(_LOCAL, "cache", None)
    _LOCAL.cache = cache
    try:
        yield
    finally:
        _LOCAL.cache = outer


def cached(t: Tensor, tag: str, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, kept per (tensor, ``tag``) in the current weight cache (if
    any). The entry holds ``t`` itself, so the id is never reused meanwhile."""
    cache = getattr(_LOCAL, "cache", None)
    if cache is None:
        return make()
    hit = cache.get((id(t), tag))
    if hit is not None and hit[0] is t:
        return hit[1]
    value = make()
    cache[(id(t), tag)] = (t, value)
    return value
