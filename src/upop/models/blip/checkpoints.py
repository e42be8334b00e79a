"""The released BLIP checkpoints (``model_base_nlvr.pth``, ``model_base_retrieval_{coco,flickr}.pth``,
``model_base_caption_capfilt_large.pth``, ``model_base_vqa_capfilt_large.pth``: a timm-style ViT ``visual_encoder``,
BERT ``text_encoder`` and ``text_decoder``) in the keys of ``upop.models.blip.modeling``'s models, through one table
per model."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

StateDict = dict[str, Any]


ORIGINAL_KEYS: tuple[tuple[str, str], ...] = (  # (pattern in the released BLIP checkpoints, key here)
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
)
TWIN_KEYS: tuple[tuple[str, str], ...] = (  # and for the NLVR model's twin cross-attention
    (r"\.crossattention\.self([01])\.", r".crossattention.branches.\1.self."),
    (r"\.crossattention\.output\.dense([01])\.", r".crossattention.branches.\1.dense."),
    (r"\.crossattention\.output\.(merge_layer|LayerNorm)\.", r".crossattention.\1."),
)
DROPPED = re.compile(r"(_m\.|^(image|text|idx|ptr)_queue$|position_ids$)")  # momentum encoders, queues, buffers


def convert_original(state: dict[str, Any], table: tuple[tuple[str, str], ...] = ORIGINAL_KEYS) -> dict[str, Any]:
    """A released BLIP checkpoint's state dict in these models' keys (unchanged when it is not in that layout):
    renamed by ``table`` (``ORIGINAL_KEYS``, plus ``TWIN_KEYS`` for NLVR), without the momentum encoders and queues
    that only pre-training and the retrieval queues use."""
    if not any(k.startswith("visual_encoder.") for k in state):
        return state
    out = {}
    for key, value in state.items():
        if DROPPED.search(key):
            continue
        for pattern, replacement in table:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def tie_lm_head(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The LM head's output layer shares the word embeddings (and its bias the head's ``bias``): a checkpoint that
    stores only one of each gets the other."""
    head = f"{prefix}cls.predictions."
    tied = {f"{head}decoder.weight": f"{prefix}bert.embeddings.word_embeddings.weight"}
    tied[f"{head}decoder.bias"] = f"{head}bias"
    for key, source in tied.items():
        if key not in state and source in state and any(k.startswith(head) for k in state):
            state = {**state, key: state[source]}
    return state


def converter(kind: str) -> Callable[[StateDict], StateDict]:
    """The key conversion of a released checkpoint for the model of ``kind`` ("nlvr", "dual_encoder", "captioner",
    "vqa"): renamed by the table (with the twin cross-attention's for NLVR), the momentum encoders and queues
    dropped, and the LM head's tied weights completed for the decoders."""
    if kind == "nlvr":
        return lambda state: convert_original(state, ORIGINAL_KEYS + TWIN_KEYS)
    if kind in ("captioner", "vqa"):
        return lambda state: tie_lm_head(convert_original(state), "text_decoder.")
    return convert_original
