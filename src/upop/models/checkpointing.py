"""Activation checkpointing (``--grad-checkpointing``): a model keeps only the input of each transformer block in the
forward pass and recomputes the block in the backward, trading about one more forward pass for the activations of
every block. Each family's own switch does it:

- timm and open_clip models: their ``set_grad_checkpointing``;
- HF transformers models and layers (ViT, CLIP, BLIP's towers, and the NLVR model's own text layers, which are HF
  layers): ``gradient_checkpointing_enable``, non-reentrant;
- the project's own block loops (Segmenter's encoder and decoder): a ``checkpointed`` flag read by ``run_block``.

Recomputation is non-reentrant and restores the random state, so dropout and drop path draw the same as in the
forward pass, and every gradient (the masks' too) is the one computed without checkpointing: a mask's gradient is
not counted twice."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from upop.errors import UPopError


def run_block(block: nn.Module, *args: Any, checkpointed: bool = False) -> Any:
    """``block(*args)``, recomputed in the backward pass when ``checkpointed`` and a gradient is being recorded."""
    if checkpointed and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def _hf(model: nn.Module) -> int:
    """Switch on every HF model inside ``model`` and any HF layer outside one; the number of layers switched on."""
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers is a dependency
        return 0
    for m in model.modules():
        if not isinstance(m, PreTrainedModel) or not m.supports_gradient_checkpointing:
            continue
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:  # layers of the project's own HF-built models (not inside a PreTrainedModel)
        if not layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            layer.gradient_checkpointing = True
    return len(layers)


def enable(model: nn.Module) -> None:
    """Switch activation checkpointing on in every transformer block of ``model`` (for training: evaluation and
    no-grad passes run as before). UPopError when the model has no blocks any family's switch reaches."""
    switched = 0
    for m in model.modules():
        if callable(getattr(m, "set_grad_checkpointing", None)):  # timm, open_clip (idempotent on nested ones)
            m.set_grad_checkpointing(True)
            switched += 1
    switched += _hf(model)
    for m in model.modules():
        if hasattr(m, "checkpointed"):
            m.checkpointed = True
            switched += 1
    if not switched:
        raise UPopError(
            f"--grad-checkpointing: a {type(model).__name__} has no blocks UPop can recompute (supported: timm, "
            "open_clip and HF transformers models, BLIP, Segmenter)"
        )
