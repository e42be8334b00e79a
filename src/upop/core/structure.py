"""Structures: one prunable unit with one mask vector, and the slices of weights its elements own.

A structure of size n owns, in each of its *row* linears, the output rows laid out as (G, n, B) (G groups: 3 * heads
for a fused qkv projection, heads for a separate q, k or v projection, 1 for an MLP's first layer; B the rows of one
element, 1 but for whole heads), and in each of its *column* linears the input columns laid out as (G, n, B) (heads
for an attention output projection, 1 for an MLP's second layer). Element j of the mask scales the B rows/columns j of
every group. Head-dimension granularity (the paper's) has B = 1 and G counting heads; whole-head granularity has
n = heads, B = head_dim and G = 3 (fused qkv) or 1; mixed granularity has n = heads x head_dim (the (head, dim)
pairs, head-major), B = 1 and G = 3 or 1, and keeps only whole heads x shared dims (``grid``). This one layout
covers fused qkv (timm), separate q/k/v (HF ViT/DeiT, CLIP, BLIP, BERT), packed ``in_proj_weight``
(``nn.MultiheadAttention``: a row "linear" that is a weight/bias pair of parameters of the attention module itself),
cross-attention (rows of another input width) and MLP pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from upop.errors import UPopError

KINDS = ("attn", "mlp")


@dataclass
class Slot:
    """A weight matrix (out, in) and its bias of a structure: by default a Linear's ``weight`` and ``bias``; for a
    packed projection, the parameters ``weight``/``bias`` names of ``module`` (e.g. ``in_proj_weight``). ``path`` is
    its name in the model, ``groups`` the G and ``block`` the B of the (G, n, B) layout."""

    path: str
    module: nn.Module
    groups: int
    weight_name: str = "weight"
    bias_name: str = "bias"
    block: int = 1
    tokens: int = 0  # tokens per sample this matrix sees at the profiling input (set for a FLOPs cost)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.weight_name)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, self.bias_name, None)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def set(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Replace the weight (and bias) by new parameters; a Linear's feature counts follow."""
        old = self.weight
        setattr(self.module, self.weight_name, nn.Parameter(weight.clone(), requires_grad=old.requires_grad))
        if bias is not None:
            setattr(self.module, self.bias_name, nn.Parameter(bias.clone(), requires_grad=self.bias.requires_grad))
        if isinstance(self.module, nn.Linear):
            self.module.out_features, self.module.in_features = weight.shape


@dataclass
class Structure:
    """One prunable unit.

    Attributes:
        name: the module name of the attention or MLP block in the model.
        kind: "attn" (elements = head dimensions, shared by all heads and by q, k, v) or "mlp" (hidden neurons).
        size: n, the number of elements (mask length).
        rows: linears whose output rows are owned (and masked after the layer), each laid out as (G, n).
        cols: linears whose input columns are owned, each laid out as (G, n).
        heads: the attention heads an element spans (0 for an MLP; 1 for a whole head); with ``block`` it gives the
            attention-matmul FLOPs of an element.
        module: the block itself (attention or MLP module), handed to ``resize``.
        resize: adapter callback ``resize(module, old_size, new_size)`` that makes the block's own bookkeeping true
            after slicing (head_dim, all_head_size, softmax scale...).
        tokens: query tokens per sample (those the first row linear sees) at the profiling input (set when a FLOPs
            cost is asked); each slot holds its own count (key/value linears of a cross-attention see the other
            tower's tokens).
        tower: the tower the structure is in ("vision", "text", ...), for per-tower reports and restrictions.
        grid: for mixed granularity, (heads, head_dim): the elements are (head, dim) pairs, head-major, and a choice
            keeps whole heads x head dims shared by the kept heads (``grid_factors``), so that the block stays a
            standard attention. ``resize_heads`` then keeps the block's attributes true after heads were sliced
            away, before ``resize`` does after head dims were.
        family: the name of the adapter that found the structure.
        softmax_scale: for attention, what the sliced block divides q.k by on weights loaded as they are:
            "original" or "kept" (``BlockSpec.softmax_scale``).
    """

    name: str
    kind: str
    size: int
    rows: list[Slot]
    cols: list[Slot]
    heads: int = 0
    module: nn.Module | None = None
    resize: Callable[[nn.Module, int, int], None] | None = None
    tokens: int = 0
    tower: str = "vision"
    block: int = 1
    grid: tuple[int, int] | None = None
    resize_heads: Callable[[nn.Module, int, int], None] | None = None
    family: str = ""
    softmax_scale: str = "original"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structure kind must be one of {KINDS}, got {self.kind!r}")
        for slot in (*self.rows, *self.cols):
            slot.block = self.block
        for slot in self.rows:
            if slot.out_features != slot.groups * self.size * self.block:
                raise UPopError(
                    f"{self.name}: {slot.path} has {slot.out_features} outputs, not {slot.groups} x {self.size}"
                    + (f" x {self.block}" if self.block > 1 else "")
                )
        for slot in self.cols:
            if slot.in_features != slot.groups * self.size * self.block:
                raise UPopError(
                    f"{self.name}: {slot.path} has {slot.in_features} inputs, not {slot.groups} x {self.size}"
                    + (f" x {self.block}" if self.block > 1 else "")
                )

    def dims_view(self) -> Structure:
        """A mixed-granularity structure seen as its head dimensions (for probes shaped like the block)."""
        if self.grid is None:
            return self
        heads, dims = self.grid
        rows = [dataclasses.replace(slot, groups=slot.groups * heads) for slot in self.rows]
        cols = [dataclasses.replace(slot, groups=slot.groups * heads) for slot in self.cols]
        return dataclasses.replace(self, size=dims, heads=heads, rows=rows, cols=cols, grid=None)

    def element_params(self) -> int:
        """Parameters one element owns: its rows (with bias) in every row linear, its columns in every column linear."""
        n = 0
        for slot in self.rows:
            n += slot.groups * (slot.in_features + (slot.bias is not None))
        for slot in self.cols:
            n += slot.groups * slot.out_features
        return n * self.block

    def element_flops(self) -> int:
        """FLOPs (2 per multiply-add) one element costs per sample: its share of every linear at the tokens that
        linear sees, and for attention its share of q @ k^T and attn @ v in every head, which cost query tokens x key
        tokens (the first row linear sees the queries, the last the keys/values: the same tokens in self-attention,
        the other tower's in cross-attention)."""
        if self.tokens <= 0:
            raise UPopError(f"{self.name}: no token count; a FLOPs cost needs example inputs given to the Pruner")
        macs = 0
        for slot in self.rows:
            macs += slot.groups * slot.in_features * (slot.tokens or self.tokens)
        for slot in self.cols:
            macs += slot.groups * slot.out_features * (slot.tokens or self.tokens)
        macs *= self.block
        keys = self.rows[-1].tokens or self.tokens
        macs += self.heads * self.block * 2 * self.tokens * keys  # (head, dim) pairs in q @ k^T and attn @ v
        return 2 * macs

    def element_cost(self, cost: str) -> int:
        return self.element_params() if cost == "params" else self.element_flops()


def slice_rows(slot: Slot, size: int, keep: torch.Tensor) -> None:
    """Keep the output rows of elements ``keep`` in every group of ``slot`` (laid out (groups, size, block))."""
    layout = (slot.groups, size, slot.block)
    w = slot.weight.detach().unflatten(0, layout)[:, keep].flatten(0, 2)
    b = slot.bias
    b = b.detach().unflatten(0, layout)[:, keep].flatten(0, 2) if b is not None else None
    slot.set(w, b)


def slice_cols(slot: Slot, size: int, keep: torch.Tensor) -> None:
    """Keep the input columns of elements ``keep`` in every group of ``slot`` (laid out (groups, size, block))."""
    w = slot.weight.detach().unflatten(1, (slot.groups, size, slot.block))[:, :, keep].flatten(1, 3)
    slot.set(w, None)


def grid_factors(structure: Structure, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a mixed-granularity structure, the kept heads and head dims whose pairs are exactly ``keep`` (pair indices
    head * head_dim + dim). Raises UPopError when ``keep`` is not whole heads x dims shared by every kept head."""
    heads, dims = structure.grid  # type: ignore[misc]
    keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1)
    kept_heads, kept_dims = torch.unique(keep // dims), torch.unique(keep % dims)
    product = (kept_heads[:, None] * dims + kept_dims[None, :]).reshape(-1)
    if keep.numel() != product.numel() or not torch.equal(torch.sort(keep).values, product):
        raise UPopError(
            f"{structure.name}: with mixed granularity a structure keeps whole heads x head dims shared by all kept "
            f"heads; heads {kept_heads.tolist()} and dims {kept_dims.tolist()} do not cover exactly the kept pairs"
        )
    return kept_heads, kept_dims


def slice_structure(structure: Structure, keep: torch.Tensor) -> None:
    """Physically prune ``structure`` to the elements ``keep`` (sorted 1-D int64), then let the adapter fix the block's
    bookkeeping. Shapes of the structure's slots are updated; ``structure.size`` becomes len(keep)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() == 0:
        raise UPopError(f"{structure.name}: a structure must keep at least one element")
    if keep.min() < 0 or keep.max() >= structure.size:
        raise UPopError(f"{structure.name}: kept indices must lie in [0, {structure.size}), got {keep.tolist()}")
    grid = structure.grid
    if grid is not None:
        kept_heads, kept_dims = grid_factors(structure, keep)
    old = structure.size
    for slot in structure.rows:
        slice_rows(slot, old, keep)
    for slot in structure.cols:
        slice_cols(slot, old, keep)
    structure.size = int(keep.numel())
    if structure.module is None:
        return
    if grid is not None:  # heads first (head_dim unchanged), then head dims (the original scale kept)
        structure.grid = (int(kept_heads.numel()), int(kept_dims.numel()))
        if structure.resize_heads is not None:
            structure.resize_heads(structure.module, grid[0], structure.grid[0])
        if structure.resize is not None:
            structure.resize(structure.module, grid[1], structure.grid[1])
    elif structure.resize is not None:
        structure.resize(structure.module, old, structure.size)
