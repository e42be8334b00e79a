"""Model-family adapters. Importing this package registers every built-in adapter."""

from upop.adapters import (  # noqa: F401  (registration)
    blip_nlvr,
    hf_bert,
    hf_blip,
    hf_clip,
    hf_vit,
    open_clip,
    segmenter,
    timm_vit,
)
from upop.adapters.base import Adapter, BlockSpec, find_adapter, register_adapter, registered_adapters

__all__ = ["Adapter", "BlockSpec", "find_adapter", "register_adapter", "registered_adapters"]
