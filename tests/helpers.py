"""Tiny models for every registered adapter, from one table. The property tests run over ``ADAPTER_MODELS``; a test
fails if an adapter is registered without an entry here, so registering is what gets a family tested."""

from __future__ import annotations

import torch
from torch import nn

from upop.adapters import registered_adapters


def timm_vit(heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    dim = heads * head_dim
    return VisionTransformer(
        img_size=image,
        patch_size=4,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_hidden / dim,
        qkv_bias=True,
        num_classes=5,
    )


def hf_vit(
    heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16, family: str = "vit"
) -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

    cfg_cls, model_cls = (
        (ViTConfig, ViTForImageClassification) if family == "vit" else (DeiTConfig, DeiTForImageClassification)
    )
    cfg = cfg_cls(
        hidden_size=heads * head_dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp_hidden,
        image_size=image,
        patch_size=4,
        num_labels=5,
    )
    return model_cls(cfg)


def hf_deit(**kw) -> nn.Module:
    return hf_vit(family="deit", **kw)


# adapter name -> model factories (each takes heads, head_dim, depth, mlp_hidden, image)
ADAPTER_MODELS = {
    "timm-vit": [timm_vit],
    "hf-vit": [hf_vit, hf_deit],
}

# (heads, head_dim, depth, mlp_hidden): odd head dims, one head, odd widths
SIZES = [(3, 7, 2, 19), (1, 5, 1, 8), (5, 3, 2, 33), (2, 8, 3, 16)]

CASES = [(name, f, size) for name, fs in ADAPTER_MODELS.items() for f in fs for size in SIZES]
CASE_IDS = [f"{f.__name__}-h{s[0]}d{s[1]}L{s[2]}m{s[3]}" for _, f, s in CASES]


def build(factory, size, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    heads, head_dim, depth, mlp = size
    return factory(heads=heads, head_dim=head_dim, depth=depth, mlp_hidden=mlp).eval()


def images(n: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def every_adapter_has_models() -> set[str]:
    return set(registered_adapters()) - set(ADAPTER_MODELS)


# CLI runs on a small slice of the built-in data; a later repetition of a flag overrides (argparse keeps the last)
CLI_DATA = "--model vit-micro --train-size 256 --val-size 64 --batch-size 32".split()


def compress_argv(pretrained, out, *extra: str) -> list[str]:
    """`upop compress` of the built-in vit-micro for one search and one retraining epoch."""
    return [
        "compress",
        *CLI_DATA,
        "--pretrained",
        str(pretrained),
        *"--epochs-search 1 --epochs 1 --interval 2".split(),
        *extra,
        "--output-dir",
        str(out),
    ]
