"""Models by name: built-in tiny configs (no download), any timm architecture, or an HF directory; and safe loading
of a state dict from a local file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upop.errors import UPopError


@dataclass(frozen=True)
class BuiltinViT:
    """A timm VisionTransformer config small enough to train on 2 CPU cores."""

    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    def build(self, num_classes: int, image_size: int | None = None) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=image_size or self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=True,
            num_classes=num_classes,
        )


BUILTIN_MODELS: dict[str, BuiltinViT] = {
    "vit-tiny": BuiltinViT(image_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2),
    "vit-micro": BuiltinViT(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
}


def model_names() -> str:
    return ", ".join([*BUILTIN_MODELS, "timm:ARCH", "hf:PATH"])


def default_image_size(spec: str) -> int | None:
    """The input size a model spec is built for (None: ask the model after building)."""
    return BUILTIN_MODELS[spec].image_size if spec in BUILTIN_MODELS else None


def build_model(spec: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """A dense model with freshly initialised weights (nothing is downloaded).

    ``spec``: a built-in name (``vit-tiny``), ``timm:ARCH`` (any timm architecture, e.g.
    ``timm:deit_small_patch16_224``) or ``hf:PATH`` (a local HF transformers directory with config.json and weights,
    loaded with from_pretrained)."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec].build(num_classes, image_size)
    kind, _, arg = spec.partition(":")
    if kind == "timm" and arg:
        import timm

        if arg not in timm.list_models():
            raise UPopError(f"timm has no architecture {arg!r}")
        if image_size:
            try:
                return timm.create_model(arg, pretrained=False, num_classes=num_classes, img_size=image_size)
            except TypeError:
                pass  # a family without a fixed input size (e.g. a CNN): no img_size argument
        return timm.create_model(arg, pretrained=False, num_classes=num_classes)
    if kind == "hf" and arg:
        return _load_hf(Path(arg), num_classes)
    raise UPopError(f"unknown model {spec!r}; accepted: {model_names()}")


def _load_hf(path: Path, num_classes: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    if not (path / "config.json").is_file():
        raise UPopError(f"{path} is not an HF model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if getattr(config, "num_labels", None) != num_classes:
        labels = {i: str(i) for i in range(num_classes)}  # a new head for this data set's classes
        kwargs.update(
            num_labels=num_classes,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            ignore_mismatched_sizes=True,
        )
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not has_weights:
        return AutoModelForImageClassification.from_config(config)
    return AutoModelForImageClassification.from_pretrained(str(path), **kwargs)


def model_image_size(model: nn.Module) -> int:
    """The square input size a built model expects."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        return int(pe.img_size[0])
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "image_size", None):
        size = config.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    raise UPopError(f"cannot tell the input size of a {type(model).__name__}; pass --image-size")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file without executing pickled code: safetensors, or torch.load with
    weights_only=True. Release checkpoints that nest the weights under "model" or "state_dict" are unwrapped, and a
    DDP "module." prefix is stripped."""
    path = Path(path)
    if not path.is_file():
        raise UPopError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad header, pickled objects refused by weights_only...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UPopError(f"checkpoint {path} is not a readable state dict ({first[:160]})") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UPopError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``model``, strictly; a mismatch names the first differing keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} ({'x'.join(map(str, state[k].shape))} vs {'x'.join(map(str, own[k].shape))})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if shapes:
            parts.append(f"wrong shape {', '.join(shapes[:3])}")
        raise UPopError(f"checkpoint {path} is not a state dict of this {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state)
