"""Exact mode: operations, a network and optimisers whose every result bit is
fixed by docs/exact-spec.md and IEEE-754, not by the torch version, ISA,
thread count or device.

- ``ops``: the exact matrix product, fixed summation trees, exp/log, sqrt,
  softmax cross-entropy, ReLU/dropout, im2col/col2im (spec sections 4-7);
- ``net``: ``ExactNet``, the spec's MLP or CNN with explicit backward;
- ``optim``: ``ExactSGD``, ``ExactAdam``, ``ExactAdamW``, ``clip_scale``
  (spec section 9; the schedule is ``pipeline.schedule``);
- ``matmul``: the multi-slice (Ozaki) exact product, at least fp32's accuracy.
"""

from __future__ import annotations

from .matmul import matmul
from .net import Arch, ExactNet
from .ops import (
                  col2im,
                  im2col,
                  mm_quantised,
                  quantise,
                  relu_dropout,
                  relu_dropout_grad,
                  softmax_xent,
                  sqrt32,
                  tree_sum,
                  tree_sum_list,
                  xexp,
                  xlog,
                  xmm,
)
from .optim import ExactAdam, ExactAdamW, ExactSGD, clip_scale, make_exact_optimizer

__all__ = ["matmul", "xmm", "quantise", "mm_quantised", "tree_sum", "tree_sum_list", "xexp", "xlog",
           "sqrt32", "softmax_xent", "relu_dropout", "relu_dropout_grad", "im2col", "col2im",
           "Arch", "ExactNet", "ExactSGD", "ExactAdam", "ExactAdamW", "clip_scale",
           "make_exact_optimizer"]
