"""HF transformers BLIP vision encoder (``BlipVisionModel``, the ``vision_model`` of every BLIP model): a fused
``self_attn.qkv`` (rows laid out q, k, v x heads x head_dim, as timm's) with ``self_attn.projection``, and an MLP
``fc1``/``fc2``. BLIP's text side is a BERT (the ``hf-bert`` adapter); a BLIP model gets the structures of both.

``BlipAttention`` derives head_dim from its input width, so a sliced one is re-classed to ``CompactBlipAttention``
(the same module and parameters, a forward that reads ``head_dim``); ``scale`` keeps 1/sqrt of the original."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from upop.adapters.registry import register_adapter
from upop.core.adapter import Adapter, BlockSpec

_COMPACT: dict[type, type] = {}


def _compact_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
    """BlipAttention's computation with the head_dim and head count held by the module, not derived from the input."""
    b, n, _ = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    scores = torch.matmul(qkv[0], qkv[1].transpose(-1, -2)) * self.scale
    probs = self.dropout(nn.functional.softmax(scores, dim=-1))
    context = torch.matmul(probs, qkv[2]).permute(0, 2, 1, 3).reshape(b, n, self.num_heads * self.head_dim)
    return self.projection(context), probs


def compact(attn: nn.Module) -> None:
    """Re-class ``attn`` (a BlipAttention) to its compact subclass, made once per class."""
    cls = type(attn)
    if getattr(cls, "_upop_compact", False):
        return
    if cls not in _COMPACT:
        _COMPACT[cls] = type(f"Compact{cls.__name__}", (cls,), {"forward": _compact_forward, "_upop_compact": True})
    attn.__class__ = _COMPACT[cls]


def _resize(attn: nn.Module, old: int, new: int) -> None:
    attn.head_dim = new
    attn.embed_dim = attn.num_heads * new
    compact(attn)


def _resize_heads(attn: nn.Module, old: int, new: int) -> None:
    attn.num_heads = new
    attn.embed_dim = new * attn.head_dim
    compact(attn)


register_adapter(
    Adapter(
        name="hf-blip",
        description="HF BLIP vision encoder: self_attn.qkv (fused), self_attn.projection + mlp.fc1, fc2",
        blocks=(
            BlockSpec(
                kind="attn",
                types=("transformers.models.blip.modeling_blip:BlipAttention",),
                rows=(("qkv", lambda m: 3 * m.num_heads),),
                cols=(("projection", lambda m: m.num_heads),),
                size=lambda m: m.head_dim,
                heads=lambda m: m.num_heads,
                resize=_resize,
                resize_heads=_resize_heads,
            ),
            BlockSpec(
                kind="mlp",
                types=("transformers.models.blip.modeling_blip:BlipMLP",),
                rows=(("fc1", 1),),
                cols=(("fc2", 1),),
                size=lambda m: m.fc1.out_features,
            ),
        ),
        towers=(("", "vision"),),
    )
)
