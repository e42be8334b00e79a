"""UPop's Segmenter (``upop.models.segmenter``): the ViT encoder's and the mask-transformer decoder's blocks share one
layout, a fused ``attn.qkv`` (rows q, k, v x heads x head_dim, as timm's) with ``attn.proj``, and an MLP
``fc1``/``fc2``. Towers: ``encoder`` and ``decoder``. The decoder's attention sees the patch tokens and the class
embeddings. Its ``Attention`` keeps ``heads``, ``head_dim`` and ``scale`` as attributes: slicing only updates
them."""

from __future__ import annotations

from torch import nn

from upop.adapters.registry import register_adapter
from upop.core.adapter import Adapter, BlockSpec


def _head_dims(attn: nn.Module, old: int, new: int) -> None:
    attn.head_dim = new  # scale keeps 1/sqrt of the original head_dim


def _heads(attn: nn.Module, old: int, new: int) -> None:
    attn.heads = new


register_adapter(
    Adapter(
        name="segmenter",
        description="UPop's Segmenter: attn.qkv (fused) + attn.proj, mlp.fc1 + fc2, encoder and decoder",
        blocks=(
            BlockSpec(
                kind="attn",
                types=("upop.models.segmenter.modeling:Attention",),
                rows=(("qkv", lambda m: 3 * m.heads),),
                cols=(("proj", lambda m: m.heads),),
                size=lambda m: m.head_dim,
                heads=lambda m: m.heads,
                resize=_head_dims,
                resize_heads=_heads,
            ),
            BlockSpec(
                kind="mlp",
                types=("upop.models.segmenter.modeling:FeedForward",),
                rows=(("fc1", 1),),
                cols=(("fc2", 1),),
                size=lambda m: m.fc1.out_features,
            ),
        ),
        towers=(("decoder", "decoder"), ("encoder", "encoder")),
    )
)
