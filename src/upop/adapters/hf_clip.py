"""HF transformers CLIP (``CLIPModel`` and its towers): separate q/k/v/out projections and an MLP (fc1, fc2) in both
the vision tower (``vision_model.``) and the text tower (``text_model.``). The softmax scale is the module's
``scale`` attribute, which slicing leaves at its original value."""

from __future__ import annotations

from torch import nn

from upop.adapters.registry import register_adapter
from upop.core.adapter import Adapter, BlockSpec


def _attn_resize(attn: nn.Module, old: int, new: int) -> None:
    attn.head_dim = new  # forward views q/k/v as (..., -1, head_dim); `scale` keeps 1/sqrt(old)


def _attn_resize_heads(attn: nn.Module, old: int, new: int) -> None:
    attn.num_heads = new  # forward views q/k/v as (..., -1, head_dim): head_dim and `scale` are unchanged


register_adapter(
    Adapter(
        name="hf-clip",
        description="HF transformers CLIP: q_proj, k_proj, v_proj, out_proj + fc1, fc2 in vision and text towers",
        blocks=(
            BlockSpec(
                kind="attn",
                types=("transformers.models.clip.modeling_clip:CLIPAttention",),
                rows=(
                    ("q_proj", lambda m: m.num_heads),
                    ("k_proj", lambda m: m.num_heads),
                    ("v_proj", lambda m: m.num_heads),
                ),
                cols=(("out_proj", lambda m: m.num_heads),),
                size=lambda m: m.head_dim,
                heads=lambda m: m.num_heads,
                resize=_attn_resize,
                resize_heads=_attn_resize_heads,
            ),
            BlockSpec(
                kind="mlp",
                types=("transformers.models.clip.modeling_clip:CLIPMLP",),
                rows=(("fc1", 1),),
                cols=(("fc2", 1),),
                size=lambda m: m.fc1.out_features,
            ),
        ),
        towers=(("vision_model.", "vision"), ("text_model.", "text")),
    )
)
