"""Exact mode: operations, layers with autograd, networks and optimisers
whose every result bit is fixed by docs/exact-spec.md and IEEE-754, not by
the torch version, ISA, thread count or device.

- ``ops``: the one-slice product ``xmm``, fixed summation trees, exp/log,
  sqrt, softmax cross-entropy, ReLU/dropout, im2col/col2im (sections 4-7);
- ``product``: ``xmmb``, the layers' blocked product (section 12);
- ``matmul``: ``matmul``, the multi-slice (Ozaki) product whose slice count
  follows the operands' range: at least fp32's accuracy for any K;
- ``functional``, ``attention``, ``arith``: layers as autograd Functions
  (sections 13-15); ``activations`` (SiLU, Sigmoid, Tanh), ``reduce``
  (sum, mean, softmax, log-softmax over any dims), ``norms`` (RMSNorm),
  ``pooling`` (max, average, adaptive average): sections 20-23;
  ``batchnorm`` (BatchNorm, var), ``conv`` (Conv1d, general Conv2d): 24-25;
  ``transformer`` (MultiheadAttention, TransformerEncoder(Layer); the
  attention masks are ``attention``'s), ``losses`` (label-smoothed
  cross-entropy, a project's loss recognised): sections 26-27;
  ``trig`` (sin, cos, rotary tables): section 28; ``fanout`` (the fixed
  sum of a value's 3+ gradients): section 29;
  ``layers``: them as nn.Modules, ``init_exact``;
- ``convert``: ``from_torch`` (a stock module tree to exact layers);
- ``guard``: what a network's own forward code may call, and the graph check;
- ``context``: the step context of dropout masks; ``modnet``: ``LayerNet``;
- ``net``: ``ExactNet``, the spec's MLP or CNN with explicit backward;
- ``optim``: ``ExactSGD``, ``ExactAdam``, ``ExactAdamW``, ``clip_scale``
  (spec section 9; the schedule is ``pipeline.core.schedule``).
"""

from __future__ import annotations

from .activations import sigmoid, silu, tanh
from .arith import add, div, mul, neg, sub
from .attention import attention
from .batchnorm import batch_norm, xvar
from .conv import conv1d
from .context import step_context
from .convert import from_torch
from .functional import conv2d, dropout, embedding, gelu, layer_norm, linear, relu
from .guard import Guard, check_graph, check_module
from .layers import (
    GELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    CausalSelfAttention,
    Conv1d,
    Conv2d,
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    LogSoftmax,
    MaxPool2d,
    ReLU,
    RMSNorm,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
    init_exact,
)
from .matmul import matmul
from .modnet import LayerNet
from .net import Arch, ExactNet
from .ops import (
    col2im,
    exp64,
    im2col,
    mm_quantised,
    quantise,
    relu_dropout,
    relu_dropout_grad,
    softmax_xent,
    sqrt32,
    tree_sum,
    xexp,
    xlog,
    xmm,
)
from .optim import ExactAdam, ExactAdamW, ExactSGD, clip_scale, make_exact_optimizer
from .norms import rms_norm
from .pooling import adaptive_avg_pool2d, avg_pool2d, max_pool2d
from .product import xmmb
from .reduce import log_softmax, softmax, xmean, xsum
from .losses import smoothed_xent
from .transformer import MultiheadAttention, TransformerEncoder, TransformerEncoderLayer
from .trig import cos, rotary_inv_freq, rotary_tables, sin

__all__ = ["matmul", "xmm", "xmmb", "quantise", "mm_quantised", "tree_sum",
           "exp64", "xexp", "xlog", "sqrt32", "softmax_xent", "relu_dropout",
           "relu_dropout_grad", "im2col", "col2im", "Arch", "ExactNet", "ExactSGD",
           "ExactAdam", "ExactAdamW", "clip_scale", "make_exact_optimizer",
           "linear", "conv2d", "embedding", "layer_norm", "gelu", "relu", "dropout",
           "attention", "add", "sub", "mul", "div", "neg",
           "Linear", "Conv2d", "Embedding", "LayerNorm", "GELU", "ReLU", "Dropout",
           "CausalSelfAttention", "init_exact", "from_torch", "Guard", "check_graph",
           "check_module", "step_context", "LayerNet", "silu", "sigmoid", "tanh", "xsum",
           "xmean", "softmax", "log_softmax", "rms_norm", "SiLU", "Sigmoid", "Tanh", "Softmax",
           "LogSoftmax", "RMSNorm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
           "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
           "batch_norm", "xvar", "conv1d", "BatchNorm1d", "BatchNorm2d", "Conv1d"]
__all__ += ["MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder",
            "smoothed_xent"]  # sections 26-27
__all__ += ["sin", "cos", "rotary_tables", "rotary_inv_freq"]  # sections 28-29
