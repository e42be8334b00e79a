"""FLOPs of ``upop.profile`` against counts made by hand from the shapes, attention matmuls included on CPU (where
timm's fused attention and HF's sdpa run a kernel torch's counter has no formula for)."""

from __future__ import annotations

import torch

import upop


def _vit_macs(tokens: int, patches: int, patch: int, dim: int, heads: int, depth: int, hidden: int, classes: int):
    """Multiply-adds of one image through a ViT: patch embedding, per block q/k/v, q @ k^T, attn @ v, output
    projection and the MLP, then the head on the class token."""
    head_dim = dim // heads
    block = tokens * dim * 3 * dim  # q, k, v
    block += 2 * heads * tokens * tokens * head_dim  # q @ k^T and attn @ v
    block += tokens * dim * dim  # output projection
    block += 2 * tokens * dim * hidden  # fc1, fc2
    return patches * 3 * patch * patch * dim + depth * block + dim * classes


def test_timm_fused_attention_is_counted_on_cpu():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, mlp_ratio=40 / 24, num_classes=5
    )
    assert all(block.attn.fused_attn for block in model.blocks)  # the SDPA path, not explicit matmuls
    expected = _vit_macs(tokens=17, patches=16, patch=4, dim=24, heads=3, depth=2, hidden=40, classes=5)
    batch = 3
    assert upop.profile(model, torch.randn(batch, 3, 16, 16))["flops"] == 2 * batch * expected


def test_hf_sdpa_attention_is_counted_on_cpu():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=40,
        image_size=16,
        patch_size=4,
        num_labels=5,
        attn_implementation="sdpa",
    )
    model = ViTForImageClassification(config)
    expected = _vit_macs(tokens=17, patches=16, patch=4, dim=24, heads=3, depth=2, hidden=40, classes=5)
    assert upop.profile(model, torch.randn(2, 3, 16, 16))["flops"] == 2 * 2 * expected


def test_the_backward_of_cpu_attention_is_counted_too():
    from upop.core.profile import flop_counter

    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    matmul = 2 * 2 * 3 * 5 * 5 * 4  # FLOPs of one (5 x 4) @ (4 x 5) product per batch element and head
    # forward: q @ k^T and attn @ v; backward (torch's flash formula): the recomputed scores and the gradients of
    # the probabilities, v, q and k
    assert counter.get_total_flops() == 2 * matmul + 5 * matmul
