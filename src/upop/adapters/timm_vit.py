"""timm Vision Transformers (ViT, DeiT, any size): fused qkv ``Linear(d, 3*H*hd)`` and ``Mlp`` (fc1, fc2)."""

from __future__ import annotations

import torch
from torch import nn

from upop.adapters.registry import register_adapter
from upop.core.adapter import Adapter, BlockSpec


def _attn_check(attn: nn.Module) -> str | None:
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        return "qk_norm normalises over head_dim, so a zeroed dimension still changes the others"
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        return "scale_norm normalises over all head dimensions"
    if getattr(attn, "gate", None) is not None:
        return "gated attention is not supported"
    return None


def _attn_resize(attn: nn.Module, old: int, new: int) -> None:
    # timm's fused path calls scaled_dot_product_attention with its default scale 1/sqrt(head_dim). Fold
    # sqrt(new/old) into the query rows so both paths keep the original softmax scale 1/sqrt(old), and keep
    # `scale` true to the new head_dim for the unfused path.
    factor = (new / old) ** 0.5
    q_rows = attn.num_heads * new
    with torch.no_grad():
        attn.qkv.weight[:q_rows] *= factor
        if attn.qkv.bias is not None:
            attn.qkv.bias[:q_rows] *= factor
    attn.head_dim = new
    attn.attn_dim = attn.num_heads * new
    attn.scale = new**-0.5


def _attn_resize_heads(attn: nn.Module, old: int, new: int) -> None:
    attn.num_heads = new  # head_dim and the softmax scale are unchanged
    attn.attn_dim = new * attn.head_dim


def _mlp_check(mlp: nn.Module) -> str | None:
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return "a norm over the hidden layer (scale_mlp_norm) is not supported"
    return None


register_adapter(
    Adapter(
        name="timm-vit",
        description="timm VisionTransformer / DeiT: timm.layers.Attention + Mlp",
        blocks=(
            BlockSpec(
                kind="attn",
                types=("timm.layers.attention:Attention",),
                rows=(("qkv", lambda m: 3 * m.num_heads),),
                cols=(("proj", lambda m: m.num_heads),),
                size=lambda m: m.head_dim,
                heads=lambda m: m.num_heads,
                resize=_attn_resize,
                check=_attn_check,
                resize_heads=_attn_resize_heads,
                softmax_scale="kept",  # the fused path's SDPA default scale: resize folds the ratio into q
            ),
            BlockSpec(
                kind="mlp",
                types=("timm.layers.mlp:Mlp",),
                rows=(("fc1", 1),),
                cols=(("fc2", 1),),
                size=lambda m: m.fc1.out_features,
                check=_mlp_check,
            ),
        ),
    )
)
