"""BERT-layout text encoders: HF transformers ``Bert*`` models and BLIP's text encoder (``BlipText*``, a BERT with
cross-attention to the image). A ``*Attention`` block holds ``self.{query,key,value}`` and ``output.dense``, a
``*Layer`` the MLP ``intermediate.dense`` + ``output.dense``. Self-attention is in the ``text`` tower;
cross-attention (``crossattention``: queries from the text, keys and values from the image, of the image's width) in
the ``cross`` tower. A BLIP text decoder (``text_decoder``, HF ``BlipTextLMHeadModel``: causal self-attention,
cross-attention to the image or the question, MLP) is the ``decoder`` tower, all of it.

Softmax scale: BERT keeps ``scaling`` (1/sqrt of the original head_dim) as an attribute, which slicing leaves alone;
BLIP's text attention divides by sqrt(attention_head_size), so slicing folds sqrt(new/old) into the query rows and
the product keeps the original scale."""

from __future__ import annotations

import torch
from torch import nn

from upop.adapters.registry import register_adapter
from upop.core.adapter import Adapter, BlockSpec


def keep_scale(attn: nn.Module, old: int, new: int) -> None:
    """``attn`` (a BERT-style self-attention: query, attention_head_size, all_head_size) now has head_dim ``new``
    instead of ``old``; keep its softmax scale 1/sqrt(old)."""
    if not hasattr(attn, "scaling"):  # the scale is derived from attention_head_size: fold the ratio into q
        with torch.no_grad():
            attn.query.weight.mul_((new / old) ** 0.5)
            if attn.query.bias is not None:
                attn.query.bias.mul_((new / old) ** 0.5)
    attn.attention_head_size = new
    attn.all_head_size = attn.num_attention_heads * new


def softmax_scale(attn: nn.Module) -> str:
    """What a sliced ``attn`` (a BERT-style self-attention) divides q.k by: its own ``scaling`` (the original
    head_dim's) where it keeps one, else sqrt(attention_head_size), the kept head_dim."""
    return "original" if hasattr(attn, "scaling") else "kept"


def heads_resized(attn: nn.Module, old: int, new: int) -> None:
    """``attn`` lost whole heads (``old`` -> ``new``); head_dim and the scale are unchanged."""
    attn.num_attention_heads = new
    attn.all_head_size = new * attn.attention_head_size


def _check(block: nn.Module) -> str | None:
    kind = getattr(block.self, "position_embedding_type", "absolute")
    if kind != "absolute":
        return f"relative position embeddings ({kind}) are sized by head_dim and not supported"
    return None


def _heads(block: nn.Module) -> int:
    return block.self.num_attention_heads


register_adapter(
    Adapter(
        name="hf-bert",
        description="HF BERT / BLIP text: attention.self.{query,key,value} + output.dense, crossattention alike, "
        "intermediate.dense + output.dense",
        blocks=(
            BlockSpec(
                kind="attn",
                types=(
                    "transformers.models.bert.modeling_bert:BertAttention",
                    "transformers.models.blip.modeling_blip_text:BlipTextAttention",
                ),
                rows=(("self.query", _heads), ("self.key", _heads), ("self.value", _heads)),
                cols=(("output.dense", _heads),),
                size=lambda m: m.self.attention_head_size,
                heads=_heads,
                resize=lambda m, old, new: keep_scale(m.self, old, new),
                resize_heads=lambda m, old, new: heads_resized(m.self, old, new),
                check=_check,
                softmax_scale=lambda m: softmax_scale(m.self),
            ),
            BlockSpec(
                kind="mlp",
                types=(
                    "transformers.models.bert.modeling_bert:BertLayer",
                    "transformers.models.blip.modeling_blip_text:BlipTextLayer",
                ),
                rows=(("intermediate.dense", 1),),
                cols=(("output.dense", 1),),
                size=lambda m: m.intermediate.dense.out_features,
            ),
        ),
        towers=(("text_decoder", "decoder"), ("crossattention", "cross"), ("", "text")),
    )
)
