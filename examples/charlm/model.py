"""A small GPT-style causal transformer for character-level language modelling.

``gpt(input_shape, num_classes)`` is an ordinary model factory: it builds and
returns a stock ``torch.nn.Module`` whose parameters take torch's default
initialisation (seed the generator before calling it for reproducible weights).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop1 = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(4 * d_model, d_model)
        self.drop2 = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, D) -> (B, heads, T, D / heads)
        head = d // self.n_head
        q, k, v = (z.reshape(b, t, self.n_head, head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attention(self.ln1(x)))
        return x + self.drop2(self.fc_out(self.act(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, context: int, vocab: int, n_layer: int, n_head: int,
                 d_model: int, dropout: float, tie_embeddings: bool = False) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        if tie_embeddings:  # GPT-2's way: the head reads out with the token embedding
            self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        positions = torch.arange(t, device=x.device)
        h = self.drop(self.tok(x) + self.pos(positions))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def gpt(input_shape: tuple[int, ...], num_classes: int, *, n_layer: int = 2, n_head: int = 4,
        d_model: int = 128, dropout: float = 0.1, tie_embeddings: bool = False) -> nn.Module:
    """Build a causal character-level transformer.

    ``input_shape`` is ``(context,)``, the tokens per example; ``num_classes``
    is the vocabulary size. The model maps int64 tokens ``(B, T)``, ``T <=
    context``, to next-token logits ``(B, T, num_classes)``: token + learned
    position embeddings, ``n_layer`` pre-norm blocks (causal multi-head
    self-attention, then a 4x GELU MLP, each with dropout and a residual),
    a final LayerNorm and a linear head; ``tie_embeddings``: the head's weight
    is the token embedding's (one tensor, trained and saved once).
    """
    if len(input_shape) != 1 or int(input_shape[0]) < 1:
        raise ValueError(f"input_shape must be (context,) with context >= 1, got {input_shape!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    if n_head < 1 or d_model < 1 or d_model % n_head != 0:
        raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_head ({n_head})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return GPT(int(input_shape[0]), num_classes, n_layer, n_head, d_model, dropout,
               bool(tie_embeddings))
