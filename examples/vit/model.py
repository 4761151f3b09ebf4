"""A small Vision Transformer for the shipped 8x8 digits (examples/vit), in
stock PyTorch only: a patch embedding (a Conv2d whose stride is the patch),
a class token and learned position embeddings (``nn.Embedding`` rows), a
stack of ``nn.TransformerEncoderLayer`` (pre-norm, GELU) in an
``nn.TransformerEncoder``, a final LayerNorm and a linear head. The loss,
``smoothed``, is torch's label-smoothed cross-entropy. Exact mode converts
both (pipeline.exact.convert; docs/exact-spec.md sections 26-27)."""

from __future__ import annotations

import torch
from torch import nn


class ViT(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, patch: int, d_model: int,
                 n_head: int, n_layer: int, dropout: float, pool: str, masked: int) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(f"image {h}x{w} is not a whole number of {patch}x{patch} patches")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool: expected 'cls' or 'mean', found {pool!r}")
        self.pool, self.masked = pool, masked
        self.tokens = (h // patch) * (w // patch) + (pool == "cls")
        self.patch = nn.Conv2d(c, d_model, patch, stride=patch)
        if pool == "cls":  # an unused parameter is refused by exact mode: none with "mean"
            self.cls = nn.Embedding(1, d_model)       # the class token, one learned row
        self.pos = nn.Embedding(self.tokens, d_model)  # learned position embeddings
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, n_head, 2 * d_model, dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.patch(x).flatten(2).transpose(1, 2)  # (B, patches, D)
        if self.pool == "cls":
            cls = self.cls(torch.zeros(b, 1, dtype=torch.long, device=x.device))
            h = torch.cat([cls, h], dim=1)
        h = self.drop(h + self.pos(torch.arange(self.tokens, device=x.device)))
        pad = None
        if self.masked:  # keys of the last ``masked`` patches take no part (a padding mask)
            pad = torch.arange(self.tokens, device=x.device) >= self.tokens - self.masked
            pad = pad.expand(b, self.tokens)
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(dim=1))


def vit(input_shape: tuple[int, ...], num_classes: int, *, patch: int = 2, d_model: int = 32,
        n_head: int = 4, n_layer: int = 2, dropout: float = 0.1, pool: str = "cls",
        masked: int = 0) -> nn.Module:
    """A ViT over ``input_shape`` (C, H, W) images -> ``num_classes`` logits.
    ``masked``: the last this many patches are hidden from attention by a key
    padding mask (0: none)."""
    return ViT(tuple(input_shape), num_classes, patch, d_model, n_head, n_layer, dropout, pool,
               masked)


# train.loss = "model:smoothed": per-example losses (the pipeline sums them and
# divides by the step's batch size), with label smoothing 0.1.
smoothed = nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)
