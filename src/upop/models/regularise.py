"""Training regularisation a recipe sets on a built model: stochastic depth (drop path) in the image encoder, rising
linearly over its blocks from 0 to the rate (BLIP's ViT and Segmenter's use 0.1), and the text tower's dropout (BERT's
hidden and attention-probability dropout; BLIP's NLVR2 and VQA train with 0.1, HF's BLIP configs say 0).

Neither changes a module's name, a parameter or an output in evaluation mode, so plans, checkpoints and compressed
models are as without them. Drop path: BLIP and HF CLIP (their image encoders' pre-norm residual blocks), Segmenter and
timm ViTs; text dropout: BLIP; another model is refused in one line."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from upop.errors import UPopError


def _rates(n: int, rate: float) -> list[float]:
    return torch.linspace(0, rate, n).tolist() if n > 1 else [rate] * n


def _branch_hook(rate: float) -> Any:
    """A forward hook that drops a residual branch's output per sample with probability ``rate`` (in training),
    scaling the kept ones by 1 / (1 - rate); a tuple output (an attention's) has its first element dropped."""
    from timm.layers import drop_path

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        if not module.training or rate <= 0:
            return output
        if isinstance(output, tuple):
            return (drop_path(output[0], rate, True), *output[1:])
        return drop_path(output, rate, True)

    return hook


def _image_blocks(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """(the kind of blocks, the image encoder's blocks in order) of a supported model."""
    vision = getattr(model, "vision_model", None)
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if layers is not None and all(hasattr(b, "self_attn") and hasattr(b, "mlp") for b in layers):
        return "hooks", list(layers)  # HF BLIP's and CLIP's encoder layers: residual branches self_attn and mlp
    encoder = getattr(model, "encoder", None)
    blocks = getattr(encoder, "blocks", None) or getattr(model, "blocks", None)
    if blocks is not None and all(hasattr(b, "drop_path") or hasattr(b, "drop_path1") for b in blocks):
        return "modules", list(blocks)  # Segmenter's encoder, timm's ViT
    return None


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth in ``model``'s image encoder: block i of n drops its residual branches with probability
    rate * i / (n - 1)."""
    from timm.layers import DropPath

    found = _image_blocks(model)
    if found is None:
        raise UPopError(
            f"--drop-path: a {type(model).__name__} has no image encoder UPop knows the residual branches of "
            "(supported: BLIP, HF CLIP, Segmenter, timm ViTs)"
        )
    how, blocks = found
    for block, r in zip(blocks, _rates(len(blocks), rate)):
        if how == "hooks":
            for handle in getattr(block, "_upop_drop_path", []):
                handle.remove()
            block._upop_drop_path = [block.self_attn.register_forward_hook(_branch_hook(r))]
            block._upop_drop_path.append(block.mlp.register_forward_hook(_branch_hook(r)))
        else:
            new = DropPath(r) if r > 0 else nn.Identity()
            for name in ("drop_path", "drop_path1", "drop_path2"):
                if hasattr(block, name):
                    setattr(block, name, new)


def set_text_dropout(model: nn.Module, rate: float) -> None:
    """The dropout of every text module of ``model`` (BLIP's text encoder and decoder: embeddings, attention
    probabilities, layer outputs)."""
    text = [m for name, m in model.named_modules() if name.split(".")[0].startswith("text_")]
    dropouts = [m for t in text for m in t.modules() if isinstance(m, nn.Dropout)]
    if not dropouts:
        raise UPopError(
            f"--text-dropout: a {type(model).__name__} has no text tower with dropout UPop can set (supported: BLIP)"
        )
    for d in dropouts:
        d.p = rate
    for t in text:
        config = getattr(t, "config", None)
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if config is not None and hasattr(config, key):
                setattr(config, key, rate)


def regularise(model: nn.Module, drop_path: float | None, text_dropout: float | None) -> None:
    """Apply the rates given (None: leave the model's own)."""
    for name, value in (("--drop-path", drop_path), ("--text-dropout", text_dropout)):
        if value is not None and not 0.0 <= value < 1.0:
            raise UPopError(f"{name} must lie in [0, 1), got {value}")
    if drop_path is not None:
        set_drop_path(model, drop_path)
    if text_dropout is not None:
        set_text_dropout(model, text_dropout)
