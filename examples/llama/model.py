"""A small LLaMA-style decoder for character-level language modelling.

``llama(input_shape, num_classes)`` is an ordinary model factory returning a
stock ``torch.nn.Module``: RMSNorm (``nn.RMSNorm``) before attention and MLP,
separate query/key/value projections, rotary position embeddings, causal
``scaled_dot_product_attention``, a SwiGLU MLP, no biases, the output head
tied to the token embedding. The rotary tables come from
``pipeline.exact.rotary_tables``, whose sin/cos are the spec's polynomials
(docs/exact-spec.md, section 28): the same bits on every machine, so the
model is valid in pinned and exact mode alike (a table built with
``torch.cos`` would be refused in exact mode).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.exact import rotary_tables


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, context: int, rope_base: float) -> None:
        super().__init__()
        self.n_head, self.head = n_head, d_model // n_head
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        cos, sin = rotary_tables(self.head, context, rope_base)  # (context, head) each
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        return x * self.cos[:t] + rotate_half(x) * self.sin[:t]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, D) -> (B, heads, T, D / heads)
        q, k, v = (w(x).reshape(b, t, self.n_head, self.head).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, hidden: int, context: int,
                 rope_base: float, eps: float) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=eps)
        self.attn = Attention(d_model, n_head, context, rope_base)
        self.mlp_norm = nn.RMSNorm(d_model, eps=eps)
        self.mlp = SwiGLU(d_model, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x))
        return h + self.mlp(self.mlp_norm(h))


class Llama(nn.Module):
    def __init__(self, context: int, vocab: int, n_layer: int, n_head: int, d_model: int,
                 hidden: int, rope_base: float, eps: float) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, hidden, context, rope_base, eps)
                                    for _ in range(n_layer))
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: one tensor, trained and saved once
        # The tied weight is the embedding's N(0, 1) (torch's default and the exact
        # spec's, section 16), so the head's logits would start with a standard
        # deviation of sqrt(d_model): scaled back to about 1 (one f32 multiply).
        self.logit_scale = d_model ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.context:
            raise ValueError(f"sequence length {x.shape[1]} exceeds the context {self.context}")
        h = self.tok(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)) * self.logit_scale


def llama(input_shape: tuple[int, ...], num_classes: int, *, n_layer: int = 2, n_head: int = 4,
          d_model: int = 128, hidden: int = 344, rope_base: float = 10000.0,
          eps: float = 1e-5) -> nn.Module:
    """Build a LLaMA-style causal decoder.

    ``input_shape`` is ``(context,)``, the tokens per example; ``num_classes``
    the vocabulary size. Maps int64 tokens ``(B, T)``, ``T <= context``, to
    next-token logits ``(B, T, num_classes)``. ``hidden``: the SwiGLU width
    (LLaMA's 8/3 of ``d_model``, here rounded to a multiple of 8);
    ``rope_base``: the rotary base; ``eps``: RMSNorm's epsilon.
    """
    if len(input_shape) != 1 or int(input_shape[0]) < 1:
        raise ValueError(f"input_shape must be (context,) with context >= 1, got {input_shape!r}")
    if num_classes < 1 or n_layer < 1 or hidden < 1:
        raise ValueError(f"num_classes, n_layer and hidden must be >= 1, got "
                         f"{num_classes}, {n_layer}, {hidden}")
    if n_head < 1 or d_model % n_head != 0 or (d_model // n_head) % 2:
        raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head}) with an "
                         f"even head size (rotary embeddings rotate pairs)")
    return Llama(int(input_shape[0]), num_classes, n_layer, n_head, d_model, hidden,
                 float(rope_base), float(eps))
