"""Exact ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and
``nn.TransformerEncoder`` (docs/exact-spec.md, section 26): torch's
semantics (masks, batch_first, packed or separate in-projection, averaged
weights, norm_first, activation) written with the exact layers, so that
``from_torch`` converts a stock transformer encoder. The parameter and
module names are torch's (a state dict loads either way).

These never call torch's fused kernels: torch's ``TransformerEncoderLayer``
and ``MultiheadAttention`` may take a native "fast path" in evaluation
(``torch._transformer_encoder_layer_fwd``, ``torch._native_multi_head_
attention``, nested tensors for padded batches); the exact classes are not
subclasses of torch's and have only the forward written here. One
difference in evaluation: torch's encoder fast path with a key padding mask
returns zeros at padded positions; exact mode returns what the layers
compute there (as torch's training path does).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as XF
from . import reduce as XR
from .attention import attention
from .context import trusted
from .layers import Linear, _uniform

__all__ = ["MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder", "merge_masks"]


def _as_float(mask: Tensor, masked_when: bool = True) -> Tensor:
    """torch's ``_canonical_mask``: a bool mask (True: masked out) as f32
    ``-inf`` / ``+0``; a float mask as it is."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        mask if masked_when else ~mask, -math.inf)


def merge_masks(attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                n: int, h: int, t: int, s: int) -> Tensor | None:
    """Section 26: MultiheadAttention's masks (True: masked out) as one
    SDPA-style mask broadcastable to ``(N, H, T, S)``: both bool (or one
    given, bool) -> the bool mask of the pairs neither masks; otherwise the
    f32 additive masks (bools as ``-inf`` / ``+0``), added (one f32 add)."""
    parts = []
    with trusted():
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (t, s):
                parts.append(attn_mask.view(1, 1, t, s))
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (n * h, t, s):
                parts.append(attn_mask.view(n, h, t, s))
            else:
                raise ValueError(f"MultiheadAttention: attn_mask of shape "
                                 f"{tuple(attn_mask.shape)}; expected (T, S) = {(t, s)} or "
                                 f"(N * num_heads, T, S) = {(n * h, t, s)}")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, s):
                raise ValueError(f"MultiheadAttention: key_padding_mask of shape "
                                 f"{tuple(key_padding_mask.shape)}; expected (N, S) = {(n, s)}")
            parts.append(key_padding_mask.view(n, 1, 1, s))
        for m in parts:
            if m.requires_grad:
                raise ValueError("MultiheadAttention: a mask with a gradient is not supported "
                                 "by exact mode")
            if m.dtype not in (torch.bool, torch.float32):
                raise ValueError(f"MultiheadAttention: masks must be bool or float32, found "
                                 f"{m.dtype}")
        if not parts:
            return None
        if all(m.dtype == torch.bool for m in parts):
            allowed = ~parts[0]
            return allowed if len(parts) == 1 else allowed & ~parts[1]
        bias = _as_float(parts[0])
        return bias if len(parts) == 1 else bias + _as_float(parts[1])


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (section 26). ``add_bias_kv`` and
    ``add_zero_attn`` are not supported (refused by ``from_torch``)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None,
                 batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim {embed_dim} is not a multiple of "
                             f"num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, float(dropout)
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        e = embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.zeros(3 * e, e))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.zeros(e, e))
            self.k_proj_weight = nn.Parameter(torch.zeros(e, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.zeros(e, self.vdim))
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * e)) if bias else None
        self.out_proj = Linear(e, e, bias)

    def reset_exact(self, seed: int, layer: int) -> None:
        """Section 26's initialisation: the in-projection weight(s) section
        3's uniform with ``fan_in`` the input width; the bias +0 (torch's)."""
        e = self.embed_dim
        with torch.no_grad():
            if self.in_proj_weight is not None:
                self.in_proj_weight.copy_(_uniform(seed, layer, 0, (3 * e, e), e))
            else:
                self.q_proj_weight.copy_(_uniform(seed, layer, 0, (e, e), e))
                self.k_proj_weight.copy_(_uniform(seed, layer, 2, (e, self.kdim), self.kdim))
                self.v_proj_weight.copy_(_uniform(seed, layer, 3, (e, self.vdim), self.vdim))
            if self.in_proj_bias is not None:
                self.in_proj_bias.zero_()

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        e, b = self.embed_dim, self.in_proj_bias
        if self.in_proj_weight is None:
            bq, bk, bv = b.split(e) if b is not None else (None, None, None)
            return (XF.linear(query, self.q_proj_weight, bq),
                    XF.linear(key, self.k_proj_weight, bk),
                    XF.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if key is value:
            if query is key:  # self-attention: one packed Linear
                return XF.linear(query, w, b).split(e, dim=-1)
            wq, wkv = w.split([e, 2 * e])
            bq, bkv = b.split([e, 2 * e]) if b is not None else (None, None)
            k, v = XF.linear(key, wkv, bkv).split(e, dim=-1)
            return XF.linear(query, wq, bq), k, v
        wq, wk, wv = w.split(e)
        bq, bk, bv = b.split(e) if b is not None else (None, None, None)
        return XF.linear(query, wq, bq), XF.linear(key, wk, bk), XF.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"MultiheadAttention: exact mode takes batched inputs (3 dims), "
                             f"found {query.dim()}, {key.dim()}, {value.dim()} dims")
        if is_causal and attn_mask is None:
            raise ValueError("MultiheadAttention: is_causal needs attn_mask (a hint that the "
                             "mask is causal), as torch")
        # The spec's own code (exact functions and data movement, no user code):
        # a trusted region of the guard, its graph checked all the same.
        with trusted():
            y, w = self._forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                 average_attn_weights, bool(is_causal))
        y = self.out_proj(y)  # a child module: its hooks run under the guard
        return (y if self.batch_first else y.transpose(0, 1)), w

    def _forward(self, query: Tensor, key: Tensor, value: Tensor,
                 key_padding_mask: Tensor | None, need_weights: bool,
                 attn_mask: Tensor | None, average_attn_weights: bool,
                 is_causal: bool) -> tuple[Tensor, Tensor | None]:
        q, k, v = self._project(query, key, value)
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        n, t, s, h, d = q.shape[0], q.shape[1], k.shape[1], self.num_heads, self.head_dim
        q = q.reshape(n, t, h, d).transpose(1, 2)
        k = k.reshape(n, s, h, d).transpose(1, 2)
        v = v.reshape(n, s, h, d).transpose(1, 2)
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        mask = None if causal else merge_masks(attn_mask, key_padding_mask, n, h, t, s)
        if need_weights and mask is not None:
            rows = mask.any(-1) if mask.dtype == torch.bool else (mask != -math.inf).any(-1)
            if not bool(rows.all()):
                raise ValueError(
                    "MultiheadAttention: a query row whose every key is masked, with "
                    "need_weights=True: torch's weights path gives NaN there (its "
                    "need_weights=False path, and exact mode's attention, +0); exact mode "
                    "refuses it: pass need_weights=False or leave a key unmasked")
        p = self.dropout if self.training else 0.0
        out = attention(q, k, v, causal=causal, dropout_p=p, attn_mask=mask,
                        weights=need_weights)
        y, w = out if need_weights else (out, None)
        if w is not None and average_attn_weights:
            w = XR.xmean(w, 1)
        return y.transpose(1, 2).reshape(n, t, self.embed_dim), w

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, " \
               f"dropout={self.dropout}, batch_first={self.batch_first}"


class TransformerEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (section 26): children ``self_attn``,
    ``linear1``, ``dropout``, ``linear2``, ``norm1``, ``norm2``, ``dropout1``,
    ``dropout2`` (and ``activation`` when a module), set by ``from_torch``;
    ``activation`` a function: the exact one the guard routes torch's to
    (``guard.exact_function``), so the layer is exact outside a guard too."""

    def __init__(self, norm_first: bool, activation: Any) -> None:
        super().__init__()
        self.norm_first = norm_first
        if not isinstance(activation, nn.Module):
            self.activation = activation

    def _sa_block(self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                  is_causal: bool) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


class TransformerEncoder(nn.Module):
    """``nn.TransformerEncoder`` (section 26): ``layers`` in order, then
    ``norm`` if any (children set by ``from_torch``). ``is_causal`` None is
    False: the mask, if given, is applied as it is (a causal mask gives the
    same bits as the causal path)."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=bool(is_causal))
        return self.norm(x) if getattr(self, "norm", None) is not None else x
