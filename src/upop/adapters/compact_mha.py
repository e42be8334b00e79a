"""Compact replacements for modules whose own forward cannot run with fewer head dimensions than their width.

``nn.MultiheadAttention`` assumes heads x head_dim == embed_dim (its packed projection is unflattened with the input
width). After UPop slices head dimensions the inner width is smaller, so the sliced module is re-classed, in place, to
``CompactMultiheadAttention``: the same parameters under the same names (``in_proj_weight``, ``in_proj_bias``,
``out_proj``), the same call signature and return value, an inner width of heads x head_dim, and the softmax scale of
the original head_dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CompactMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with ``head_dim`` independent of ``embed_dim`` (made by ``compact_mha``)."""

    head_dim: int
    scale: float

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        heads, hd = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        b, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, w_q, b_q).view(b, lq, heads, hd).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(b, lk, heads, hd).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(b, lk, heads, hd).transpose(1, 2)
        mask = _additive_mask(attn_mask, key_padding_mask, b, heads, lq, lk, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.scale
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(
                    torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None, scale=self.scale
            )
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, heads * hd))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        if weights is not None and not batched:
            weights = weights.squeeze(0)
        return out, weights


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    b: int,
    heads: int,
    lq: int,
    lk: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """MultiheadAttention's masks (bool: True = masked out; float: added) as one additive (B, H, Lq, Lk) mask."""
    out = None
    if attn_mask is not None:
        m = _as_additive(attn_mask, dtype)
        m = m.view(b, heads, lq, lk) if m.dim() == 3 else m.view(1, 1, lq, lk)
        out = m
    if key_padding_mask is not None:
        m = _as_additive(key_padding_mask, dtype).view(b, 1, 1, lk)
        out = m if out is None else out + m
    return out


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def compact_mha(attn: nn.MultiheadAttention, old: int, new: int) -> None:
    """Make a sliced ``attn`` (head_dim ``old`` -> ``new``) run: re-class it and record head_dim and the scale."""
    if not isinstance(attn, CompactMultiheadAttention):
        attn.scale = old**-0.5  # the original head_dim's softmax scale
        attn.__class__ = CompactMultiheadAttention
    attn.head_dim = new


def compact_mha_heads(attn: nn.MultiheadAttention, old: int, new: int) -> None:
    """Make ``attn`` with whole heads sliced away (``old`` -> ``new`` heads, head_dim unchanged) run."""
    if not isinstance(attn, CompactMultiheadAttention):
        attn.scale = attn.head_dim**-0.5
        attn.__class__ = CompactMultiheadAttention
    attn.num_heads = new
