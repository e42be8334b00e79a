"""The project's BLIP NLVR model (``upop.models.blip.modeling.BlipNlvr``): its vision encoder and its text encoder's
self-attention and MLP are HF BLIP's (the ``hf-blip`` and ``hf-bert`` adapters); this adapter adds the twin cross-
attention. Every text layer attends to each image with its own branch (``crossattention.branches.0`` to the left
image, ``.1`` to the right): query/key/value of BLIP's text attention and the branch's own output projection
``dense``. Each branch is its own structure, in the ``cross`` tower."""

from __future__ import annotations

from upop.adapters.hf_bert import heads_resized, keep_scale, softmax_scale
from upop.adapters.registry import register_adapter
from upop.core.adapter import Adapter, BlockSpec


def _heads(branch) -> int:
    return branch.self.num_attention_heads


register_adapter(
    Adapter(
        name="blip-nlvr",
        description="UPop's BLIP NLVR: twin cross-attention branches self.{query,key,value} + dense",
        blocks=(
            BlockSpec(
                kind="attn",
                types=("upop.models.blip.modeling:TwinBranch",),
                rows=(("self.query", _heads), ("self.key", _heads), ("self.value", _heads)),
                cols=(("dense", _heads),),
                size=lambda m: m.self.attention_head_size,
                heads=_heads,
                resize=lambda m, old, new: keep_scale(m.self, old, new),
                resize_heads=lambda m, old, new: heads_resized(m.self, old, new),
                softmax_scale=lambda m: softmax_scale(m.self),
            ),
        ),
        towers=(("", "cross"),),
    )
)
