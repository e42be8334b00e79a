"""open_clip CLIP models (including those built from OpenAI-format weights): every ``ResidualAttentionBlock`` of the
vision tower (``visual.``) and the text tower (``transformer.``) holds an ``nn.MultiheadAttention`` with a packed
``in_proj_weight`` (rows laid out q, k, v x heads x head_dim) and an MLP ``c_fc``/``c_proj``."""

from __future__ import annotations

from torch import nn

from upop.adapters.compact_mha import compact_mha, compact_mha_heads
from upop.adapters.registry import register_adapter
from upop.core.adapter import Adapter, BlockSpec


def _attn_check(attn: nn.MultiheadAttention) -> str | None:
    if not attn._qkv_same_embed_dim:
        return "separate q/k/v projection weights (kdim/vdim) are not supported"
    if attn.bias_k is not None:
        return "add_bias_kv is not supported"
    return None


register_adapter(
    Adapter(
        name="open-clip",
        description="open_clip CLIP: ResidualAttentionBlock with nn.MultiheadAttention (packed in_proj) + c_fc, c_proj",
        blocks=(
            BlockSpec(
                kind="attn",
                types=("open_clip.transformer:ResidualAttentionBlock",),
                at="attn",
                rows=(("in_proj_weight", lambda m: 3 * m.num_heads),),
                cols=(("out_proj", lambda m: m.num_heads),),
                size=lambda m: getattr(m, "head_dim", m.embed_dim // m.num_heads),
                heads=lambda m: m.num_heads,
                resize=compact_mha,
                check=_attn_check,
                resize_heads=compact_mha_heads,
            ),
            BlockSpec(
                kind="mlp",
                types=("open_clip.transformer:ResidualAttentionBlock",),
                at="mlp",
                rows=(("c_fc", 1),),
                cols=(("c_proj", 1),),
                size=lambda m: m.c_fc.out_features,
            ),
        ),
        towers=(("visual.", "vision"), ("transformer.", "text"), ("text.", "text")),
    )
)
