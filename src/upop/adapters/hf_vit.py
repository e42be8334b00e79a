"""HF transformers ViT and DeiT (``ViTForImageClassification``, ``DeiTForImageClassification`` and their bare
models): separate q/k/v/o projections and an MLP (fc1, fc2). The softmax scale is the module's ``scaling``
attribute, which slicing leaves at its original value."""

from __future__ import annotations

from torch import nn

from upop.adapters.registry import register_adapter
from upop.core.adapter import Adapter, BlockSpec


def _attn_resize(attn: nn.Module, old: int, new: int) -> None:
    attn.head_dim = new  # forward views q/k/v as (-1, head_dim); `scaling` keeps 1/sqrt(old)


def _attn_resize_heads(attn: nn.Module, old: int, new: int) -> None:
    attn.num_attention_heads = new  # forward views q/k/v as (-1, head_dim): head_dim and `scaling` are unchanged


register_adapter(
    Adapter(
        name="hf-vit",
        description="HF transformers ViT / DeiT: q_proj, k_proj, v_proj, o_proj + fc1, fc2",
        blocks=(
            BlockSpec(
                kind="attn",
                types=(
                    "transformers.models.vit.modeling_vit:ViTAttention",
                    "transformers.models.deit.modeling_deit:DeiTAttention",
                ),
                rows=(
                    ("q_proj", lambda m: m.num_attention_heads),
                    ("k_proj", lambda m: m.num_attention_heads),
                    ("v_proj", lambda m: m.num_attention_heads),
                ),
                cols=(("o_proj", lambda m: m.num_attention_heads),),
                size=lambda m: m.head_dim,
                heads=lambda m: m.num_attention_heads,
                resize=_attn_resize,
                resize_heads=_attn_resize_heads,
            ),
            BlockSpec(
                kind="mlp",
                types=("transformers.models.vit.modeling_vit:ViTMLP", "transformers.models.deit.modeling_deit:DeiTMLP"),
                rows=(("fc1", 1),),
                cols=(("fc2", 1),),
                size=lambda m: m.fc1.out_features,
            ),
        ),
    )
)
