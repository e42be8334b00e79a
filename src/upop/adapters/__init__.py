"""Model-family adapters: one table per family and the registry that finds them. Importing this package registers
every built-in family; ``Pruner`` and ``apply_plan`` here are the core's with the adapter looked up in the registry."""

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
from upop.adapters.api import Pruner, apply_plan
from upop.adapters.registry import find_adapter, register_adapter, registered_adapters
from upop.core.adapter import Adapter, BlockSpec

__all__ = ["Adapter", "BlockSpec", "Pruner", "apply_plan", "find_adapter", "register_adapter", "registered_adapters"]
