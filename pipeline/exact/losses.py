"""Label-smoothed softmax cross-entropy with an ignored class
(docs/exact-spec.md, section 27), and the recognition of a project's loss
(``train.loss = "module:function"``) that is torch's cross-entropy:
``F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="none",
label_smoothing=a, ignore_index=i)`` or an ``nn.CrossEntropyLoss(reduction=
"none", label_smoothing=a)`` instance. Any other loss is refused: exact mode
computes the loss's gradient by the spec, not by autograd through user code.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode, resolve_name

from ..core.errors import ConfigError
from .flat import rn32
from .ops import _scalar, _xlog_finite, softmax_xent, tree_sum, xexp

__all__ = ["Xent", "smoothed_xent", "recognise_loss"]

_I64 = torch.int64


@dataclass(frozen=True)
class Xent:
    """Section 27's loss: label smoothing ``a`` in [0, 1], the ignored class."""

    smoothing: float = 0.0
    ignore_index: int | None = None

    def __call__(self, logits: Tensor, labels: Tensor, n_global: int) -> tuple[Tensor, Tensor]:
        return smoothed_xent(logits, labels, n_global, self.smoothing, self.ignore_index)


def smoothed_xent(logits: Tensor, labels: Tensor, n_global: int, smoothing: float = 0.0,
                  ignore_index: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-row loss (f32, ``(rows,)``) and the gradient of the global-mean
    loss wrt ``logits (rows, C)`` (section 27): ``smoothing = 0`` and no
    ignored class is section 7's ``softmax_xent``, bit for bit."""
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], found {smoothing!r}")
    if smoothing == 0.0 and ignore_index is None:
        return softmax_xent(logits, labels, n_global)
    labels = labels.to(device=logits.device, dtype=_I64).view(-1)
    rows, c = logits.shape
    ignored = labels == ignore_index if ignore_index is not None else \
        torch.zeros(rows, dtype=torch.bool, device=logits.device)
    idx = torch.where(ignored, 0, labels).view(-1, 1)
    if bool(((idx < 0) | (idx >= c)).any()):
        raise ValueError(f"cross-entropy: a target outside [0, {c}) that is not ignore_index")
    dz = logits - logits.amax(1, keepdim=True)
    e = xexp(dz)
    s = tree_sum(e, 1)
    big_l = _xlog_finite(s)                              # xlog(s), s >= 1
    loss = big_l - dz.gather(1, idx).view(-1)            # nll
    if smoothing > 0.0:
        sm = big_l - tree_sum(dz, 1).div_(_scalar(dz, float(c)))
        loss = loss.mul_(_scalar(loss, rn32(1.0 - smoothing))).add_(
            sm.mul_(_scalar(sm, rn32(smoothing))))
    g = e.div_(s.view(-1, 1))                            # P = e / s, (rows, C)
    py = g.gather(1, idx)
    g.sub_(_scalar(g, rn32(smoothing / c)))              # P - q off the label
    g.scatter_(1, idx, py.sub_(_scalar(py, rn32((1.0 - smoothing) + smoothing / c))))
    g.div_(_scalar(g, float(n_global)))
    if bool(ignored.any()):                              # +0 loss and gradient
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        loss = torch.where(ignored, zero, loss)
        g = torch.where(ignored.view(-1, 1), zero, g)
    return loss, g


# ------------------------------------------------------------ recognition
def _ce_signature(input: Any, target: Any, weight: Any = None, size_average: Any = None,
                  ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> None:
    """F.cross_entropy's parameters (for binding a recorded call)."""


class _Probe(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], Tensor]] = []
        self.other: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        from .guard import _MOVE, _basic_index

        kwargs = kwargs or {}
        name = resolve_name(func) or getattr(func, "__qualname__", repr(func))
        if name == "torch.nn.functional.cross_entropy":
            with torch._C.DisableTorchFunction():
                out = func(*args, **kwargs)
            self.calls.append((args, kwargs, out))
            return out
        basic = name == "torch.Tensor.__getitem__" and _basic_index(args[1])
        if name not in _MOVE and not basic:
            self.other.append(name)
        return func(*args, **kwargs)


def recognise_loss(fn: Any, logits_shape: tuple[int, ...], name: str) -> Xent:
    """The section 27 loss that ``fn(logits, y)`` computes, found by calling
    it once on distinct values of ``logits_shape`` (the pipeline's logits;
    the targets are its leading dims): one ``F.cross_entropy`` call on the
    logits' rows (``(-1, C)`` in C order) and the targets flattened, with
    ``reduction`` "none" or "sum" (the pipeline sums what a loss returns),
    no ``weight``, returned as it is. ConfigError (exit 2) otherwise."""
    where = f"train.loss = {name!r}"
    c = logits_shape[-1]
    n = 1
    for d in logits_shape:
        n *= d
    logits = (torch.arange(n, dtype=torch.float32) * 0.001).reshape(logits_shape)
    y = (torch.arange(n // c, dtype=_I64) % c).reshape(logits_shape[:-1])
    probe = _Probe()
    why = []
    try:
        with probe:
            out = fn(logits, y)
    except Exception as e:  # noqa: BLE001 - user code: reported
        raise ConfigError(where, [f"exact mode called the loss once to read it and it failed: "
                                  f"{type(e).__name__}: {e}"]) from None
    if probe.other:
        why.append(f"it calls {', '.join(sorted(set(probe.other)))} besides F.cross_entropy")
    if len(probe.calls) != 1:
        why.append(f"it calls F.cross_entropy {len(probe.calls)} times (expected once)")
    if why:
        raise ConfigError(where, [
            f"exact mode takes a loss that is torch's cross-entropy as it is (section 27): "
            f"{'; '.join(why)}. Write it as F.cross_entropy(logits.reshape(-1, C), "
            f"y.reshape(-1), reduction='none', label_smoothing=a) or nn.CrossEntropyLoss("
            f"reduction='none', label_smoothing=a), or train in pinned mode"])
    args, kwargs, result = probe.calls[0]
    try:
        bound = inspect.signature(_ce_signature).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise ConfigError(where, [f"F.cross_entropy: {e}"]) from None
    inp, tgt = bound["input"], bound.get("target")
    problems = []
    if out is not result:
        problems.append("it changes F.cross_entropy's result before returning it (return it as "
                        "it is; the pipeline sums it)")
    if not (isinstance(inp, Tensor) and inp.shape == (n // c, c)
            and torch.equal(inp, logits.reshape(-1, c))):
        problems.append(f"F.cross_entropy's input must be the logits' rows, "
                        f"logits.reshape(-1, {c}) (C order)")
    if not (isinstance(tgt, Tensor) and tgt.dtype == _I64 and torch.equal(tgt, y.reshape(-1))):
        problems.append("F.cross_entropy's target must be the class indices y.reshape(-1)")
    if bound.get("weight") is not None:
        problems.append("weight (per-class weights) is not supported")
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        problems.append("size_average and reduce (deprecated) must be None")
    reduction = bound.get("reduction", "mean")
    if reduction not in ("none", "sum"):
        problems.append(f"reduction must be 'none' (or 'sum'): the pipeline sums the loss and "
                        f"divides by the step's targets; found {reduction!r}")
    a = bound.get("label_smoothing", 0.0)
    if not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
        problems.append(f"label_smoothing must be a number in [0, 1], found {a!r}")
    ignore = bound.get("ignore_index", -100)
    if not isinstance(ignore, int):
        problems.append(f"ignore_index must be an int, found {ignore!r}")
    if problems:
        raise ConfigError(where, [f"exact mode: {p}" for p in problems])
    return Xent(float(a), None if not 0 <= ignore < c else int(ignore))
