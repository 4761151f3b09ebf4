"""Where a model's constant tensors came from (docs/exact-spec.md, section
28): exact mode keeps a buffer the factory computed only if its values are
the same on every machine by construction.

Two records, both keyed by the identity of a tensor's root (a view's
``_base``), held weakly, with the root's version counter (any in-place
update of the root or of a view of it moves it):

- *made*: tensors the exact helpers returned (``rotary_tables``,
  ``rotary_inv_freq``): spec arithmetic, the same bits everywhere;
- *tainted*: tensors a factory produced, while ``recorder.recording()`` watched it
  (a TorchFunctionMode), by an operation whose result the spec does not fix
  (``torch.cos``, ``exp``, ``pow``, ``linspace``, ``randn`` from the global
  generator, ``empty``, ...) or from a tainted input, with the op's name.

(The recorder lives in pipeline.exact.recorder: it needs the guard's lists of
exact ops, and the guard needs this registry through trig.)

``constant_problem`` then decides a buffer: tainted -> refused naming the op;
made -> kept; otherwise whole numbers (and infinities) or non-float -> kept,
anything else -> refused (a value of unknown origin). Exact ops seen while
recording (data movement, ``+ - * /``, comparisons, ``arange``/``zeros``/
``ones``/``full``/``tensor``) keep their result untainted, and made when its
tensor inputs are (or hold whole numbers) and its number arguments are
whole: ``torch.arange(8.0) / 8`` is kept; ``* 0.1`` or ``torch.tensor`` of
a list of floats stays of unknown origin (``math.cos`` or NumPy may have
computed them), kept only if whole.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["register_exact_constant", "is_exact_constant", "taint_of", "taint",
           "clean", "constant_problem", "HELPERS"]

HELPERS = "pipeline.exact.rotary_tables (or rotary_inv_freq)"
_MADE: dict[int, tuple[Any, int]] = {}
_TAINT: dict[int, tuple[Any, str]] = {}


def _root(t: Tensor) -> Tensor:
    return t._base if t._base is not None else t


def _remember(book: dict[int, tuple[Any, Any]], t: Tensor, value: Any) -> None:
    key = id(t)
    book[key] = (weakref.ref(t, lambda _r, key=key, book=book: book.pop(key, None)), value)


def register_exact_constant(t: Tensor) -> None:
    """Record ``t`` (a tensor an exact helper computed; its root, if a view)
    as spec-made."""
    root = _root(t)
    _remember(_MADE, root, root._version)
    _TAINT.pop(id(root), None)


def is_exact_constant(t: Tensor) -> bool:
    """Whether ``t`` is, or is a view of, a tensor an exact helper returned,
    not updated in place since."""
    root = _root(t)
    got = _MADE.get(id(root))
    return got is not None and got[0]() is root and root._version == got[1]


def taint_of(t: Tensor) -> str | None:
    """The name of the non-exact op that produced ``t``'s root while a
    factory was recorded, or None."""
    root = _root(t)
    got = _TAINT.get(id(root))
    return got[1] if got is not None and got[0]() is root else None


def taint(t: Tensor, why: str) -> None:
    root = _root(t)
    _remember(_TAINT, root, why)
    _MADE.pop(id(root), None)


def clean(t: Tensor) -> bool:
    """Values the same on every machine: non-float, spec-made, or whole."""
    if not t.is_floating_point() or is_exact_constant(t):
        return True
    finite = t[torch.isfinite(t)]
    return bool((finite == finite.round()).all())


def constant_problem(t: Tensor) -> str | None:
    """Why a constant tensor of a model (a buffer) may hold other values on
    another machine, or None."""
    why = taint_of(t)
    if why is not None:
        return (f"was computed in the factory by {why}, which docs/exact-spec.md does not "
                f"fix to the bit (torch's kernels round differently by machine): build "
                f"rotary tables with {HELPERS}, other constants from integers, or compute "
                f"them in forward with exact ops; or train in pinned mode")
    if clean(t):
        return None
    return (f"holds computed float values, which torch's kernels may round differently on "
            f"another machine (e.g. a cos/exp table): build rotary tables with {HELPERS} "
            f"and register them (or a view) as the buffer, other constants from integers; "
            f"or train in pinned mode")
