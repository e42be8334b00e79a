"""Segmenter (Strudel et al., ICCV 2021): a ViT encoder and a mask-transformer decoder, with the parameter names of
the released checkpoints (``checkpoint.pth`` beside its ``variant.yml``), so they load with ``weights_only=True``.

Encoder: ``encoder.patch_embed.proj`` (a Conv2d), ``cls_token`` (and ``dist_token`` for DeiT backbones),
``pos_embed`` (interpolated to other grids), timm-layout ``blocks.N`` (``norm1``, ``attn.qkv`` fused as q, k, v x heads
x head_dim, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) and ``norm``. Mask-transformer decoder: ``proj_dec``
(encoder width -> decoder width), learnable class embeddings ``cls_emb`` (1, classes, width) appended to the patch
tokens, ``blocks.N`` as the encoder's, ``decoder_norm``, the patch and class projections ``proj_patch`` and
``proj_classes``; the masks are the scalar products of the L2-normalised projected patches and classes, normalised
by ``mask_norm`` (a LayerNorm over the classes). The linear decoder (``head``) is the variant. The output is upsampled
to the input size. The encoder's ImageNet head (``encoder.head``), unused for segmentation, is not part of the model
and is dropped when a released checkpoint is read (``upop.models.segmenter.variant``).

Attention reads its head count and head_dim from attributes (not from the input width), with PyTorch's fused
attention and the scale of the original head_dim, so a pruned block needs no other class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from upop.errors import UPopError
from upop.models.checkpointing import run_block


def _init(module: nn.Module) -> None:
    """The released models' initialisation: truncated normal(0.02) linear weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` and an output ``proj``; ``heads`` and ``head_dim`` are
    attributes (slicing changes them), ``scale`` stays 1/sqrt of the original head_dim."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0, drop_path: float = 0.0) -> None:
        from timm.layers import DropPath

        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, hidden, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _blocks(n: int, dim: int, heads: int, hidden: int, dropout: float, drop_path: float) -> nn.ModuleList:
    rates = torch.linspace(0, drop_path, n).tolist() if n else []
    return nn.ModuleList([Block(dim, heads, hidden, dropout, r) for r in rates])


class PatchEmbedding(nn.Module):
    def __init__(self, image_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Encoder(nn.Module):
    """The ViT encoder; returns the normalised tokens (extra tokens first)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ff: int | None = None,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        distilled: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointed = False  # recompute the blocks in the backward (upop.models.checkpointing)
        self.patch_size, self.d_model, self.distilled = patch_size, d_model, bool(distilled)
        self.patch_embed = PatchEmbedding(image_size, patch_size, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        if self.distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, d_model))
        extra = 1 + self.distilled
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.grid**2 + extra, d_model))
        self.dropout = nn.Dropout(dropout)
        self.blocks = _blocks(n_layers, d_model, n_heads, d_ff or 4 * d_model, dropout, drop_path_rate)
        self.norm = nn.LayerNorm(d_model)
        for p in (self.pos_embed, self.cls_token, *([self.dist_token] if self.distilled else [])):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embeddings for a ``grid`` of patches (bilinear interpolation of the trained grid)."""
        extra = 1 + self.distilled
        if grid == (self.patch_embed.grid, self.patch_embed.grid):
            return self.pos_embed
        tokens, patches = self.pos_embed[:, :extra], self.pos_embed[:, extra:]
        side = self.patch_embed.grid
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        return torch.cat([tokens, patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        x = self.patch_embed(images)
        tokens = [self.cls_token.expand(b, -1, -1)]
        if self.distilled:
            tokens.append(self.dist_token.expand(b, -1, -1))
        x = torch.cat([*tokens, x], dim=1)
        x = self.dropout(x + self.positions((h // self.patch_size, w // self.patch_size)))
        for block in self.blocks:
            x = run_block(block, x, checkpointed=self.checkpointed)
        return self.norm(x)


class MaskTransformer(nn.Module):
    """The mask-transformer decoder: patch tokens and class embeddings through ``blocks``, masks (B, classes, h, w)
    from their normalised projections' scalar products."""

    def __init__(
        self,
        n_cls: int,
        d_encoder: int,
        n_layers: int,
        n_heads: int,
        d_model: int,
        d_ff: int,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.checkpointed = False  # recompute the blocks in the backward (upop.models.checkpointing)
        self.n_cls = n_cls
        scale = d_model**-0.5
        self.blocks = _blocks(n_layers, d_model, n_heads, d_ff, dropout, drop_path_rate)
        self.cls_emb = nn.Parameter(torch.zeros(1, n_cls, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)
        self.apply(_init)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = torch.cat([self.proj_dec(x), self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = run_block(block, x, checkpointed=self.checkpointed)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, : -self.n_cls] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, -self.n_cls :] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, patches, classes)
        return masks.transpose(1, 2).reshape(x.shape[0], self.n_cls, *grid)


class DecoderLinear(nn.Module):
    """The linear decoder: one Linear from each patch token to the class scores."""

    def __init__(self, n_cls: int, d_encoder: int) -> None:
        super().__init__()
        self.n_cls = n_cls
        self.head = nn.Linear(d_encoder, n_cls)
        self.apply(_init)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.head(x).transpose(1, 2).reshape(x.shape[0], self.n_cls, *grid)


class Segmenter(nn.Module):
    """``forward(images (B, 3, H, W))`` -> class scores (B, classes, H, W): the image padded to a multiple of the
    patch size, encoded, decoded on the patch grid, upsampled (bilinear) and cut back to H x W."""

    def __init__(self, encoder: Encoder, decoder: nn.Module, n_cls: int) -> None:
        super().__init__()
        self.n_cls, self.patch_size = n_cls, encoder.patch_size
        self.encoder, self.decoder = encoder, decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[2:]
        ps = self.patch_size
        padded = F.pad(images, (0, (-w) % ps, 0, (-h) % ps))
        grid = (padded.shape[2] // ps, padded.shape[3] // ps)
        x = self.encoder(padded)[:, 1 + self.encoder.distilled :]
        masks = self.decoder(x, grid)
        masks = F.interpolate(masks, size=padded.shape[2:], mode="bilinear", align_corners=False)
        return masks[:, :, :h, :w]


def build_segmenter(net: dict[str, Any]) -> Segmenter:
    """A Segmenter from a ``variant.yml``'s ``net_kwargs`` (image_size, patch_size, d_model, n_heads, n_layers,
    distilled, dropout, drop_path_rate, n_cls, decoder: {name: mask_transformer | linear, n_layers, dropout,
    drop_path_rate}); the mask transformer has the encoder's width and width / 64 heads, as the original's."""
    try:
        size = net["image_size"]
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        d_model, n_cls = int(net["d_model"]), int(net["n_cls"])
        encoder = Encoder(
            size,
            int(net["patch_size"]),
            d_model,
            int(net["n_heads"]),
            int(net["n_layers"]),
            int(net.get("d_ff") or 4 * d_model),
            float(net.get("dropout", 0.0)),
            float(net.get("drop_path_rate", 0.0)),
            bool(net.get("distilled", False)),
        )
        dec = dict(net.get("decoder") or {"name": "linear"})
        name = dec.get("name", "linear")
        if name == "mask_transformer":
            heads = int(dec.get("n_heads") or max(1, d_model // 64))
            decoder: nn.Module = MaskTransformer(
                n_cls,
                d_model,
                int(dec.get("n_layers", 2)),
                heads,
                d_model,
                int(dec.get("d_ff") or 4 * d_model),
                float(dec.get("dropout", 0.0)),
                float(dec.get("drop_path_rate", 0.0)),
            )
        elif "linear" in name:
            decoder = DecoderLinear(n_cls, d_model)
        else:
            raise UPopError(f"unknown Segmenter decoder {name!r}; supported: mask_transformer, linear")
    except (KeyError, TypeError, ValueError) as e:
        raise UPopError(f"not a Segmenter configuration (net_kwargs): {type(e).__name__} {e}") from None
    return Segmenter(encoder, decoder, n_cls)
