"""Whether this process computes with IEEE-754 subnormals, as exact mode's
arithmetic requires (docs/exact-spec.md, notation): flush-to-zero (a
subnormal result becomes 0) or denormals-are-zero (a subnormal operand
reads as 0) change results silently. Either is set per thread by
``torch.set_flush_denormal(True)`` or by loading a library built with
``-ffast-math`` (its start-up code sets both), so the check runs on the
main thread and on every intra-op thread (threads started later inherit the
main thread's setting).
"""

from __future__ import annotations

import torch

from .consts import GRAIN

__all__ = ["subnormal_problem"]

# (dtype, its integer view, the bits of: a normal x, a normal y with x * y
# subnormal, that subnormal, and 1), written as integers: converting a float
# (or comparing floats) would itself flush them.
_CASES = ((torch.float32, torch.int32,                   # 2^-100, 2^-40, 2^-140, 1
           0x0D800000, 0x2B800000, 0x00000200, 0x3F800000),
          (torch.float64, torch.int64,                   # 2^-600, 2^-460, 2^-1060, 1
           0x1A70000000000000, 0x2330000000000000, 0x0000000000004000, 0x3FF0000000000000))


def _filled(n: int, bits: int, dtype: torch.dtype, view: torch.dtype) -> torch.Tensor:
    return torch.full((n,), bits, dtype=view).view(dtype)


def subnormal_problem(every_thread: bool = True) -> str | None:
    """None if float32 and float64 subnormals are produced and read as IEEE
    says on every CPU thread torch runs elementwise work on (``every_thread``
    False: on this thread only, starting no pool thread), else what is wrong."""
    n = 2 * GRAIN * max(1, torch.get_num_threads()) if every_thread else 64
    for dtype, view, x, y, s, one in _CASES:
        sub = _filled(n, s, dtype, view)
        if not torch.equal(_filled(n, x, dtype, view).mul_(_filled(n, y, dtype, view)).view(view),
                           sub.view(view)):
            return (f"this process flushes subnormal {dtype} results to zero (flush-to-zero: "
                    f"torch.set_flush_denormal(True), or a library built with -ffast-math)")
        if not torch.equal(_filled(n, one, dtype, view).mul_(sub).view(view), sub.view(view)):
            return (f"this process reads subnormal {dtype} operands as zero "
                    f"(denormals-are-zero: torch.set_flush_denormal(True), or a library built "
                    f"with -ffast-math)")
    return None
