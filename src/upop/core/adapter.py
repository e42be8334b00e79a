"""The adapter interface: where a model family keeps its attention and MLP blocks, and in which layout. The core
knows "an adapter", never a family: the families' tables and their registry live in ``upop.adapters``.

An adapter is a table of ``BlockSpec`` rows plus one registration line (``upop.register_adapter``). A subclass (or
instance) provides exactly:

- ``name``: a unique short name (stored in every plan).
- ``description``: one line for error messages listing what is supported.
- ``blocks``: the ``BlockSpec`` rows. A model matches the adapter when it holds at least one module of a row's type.

Types are named as ``"package.module:Class"`` strings and resolved only if that module is already imported, so
registering an adapter never imports its library, and a model of a library that was never imported cannot match.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from upop.core.structure import Slot, Structure
from upop.errors import UPopError


@dataclass(frozen=True)
class BlockSpec:
    """One row of an adapter's table.

    Attributes:
        kind: "attn" or "mlp".
        types: the block classes, as ``"module.path:ClassName"`` strings.
        rows: (child linear name, groups) pairs whose output rows the mask scales; groups is an int or a callable of
            the block (e.g. ``lambda m: 3 * m.num_heads``).
        cols: (child linear name, groups) pairs whose input columns are sliced.
        size: the block's mask length (head_dim for attention, hidden width for an MLP).
        heads: attention heads of the block (None for an MLP).
        resize: ``resize(block, old, new)`` keeps the block's own attributes true after slicing head dims (or MLP
            neurons).
        resize_heads: for attention, ``resize_heads(block, old_heads, new_heads)`` keeps them true after whole heads
            were sliced away (head_dim unchanged); without it the family supports only head-dim granularity.
        check: returns a reason why masking this block would not match slicing it (or None when it is fine).
        at: the structure is this child of the matched block (e.g. "mlp" of a residual block holding attention and
            MLP); rows/cols are then relative to it. A row may also name a 2-D weight parameter (a packed projection
            such as ``in_proj_weight``); its bias is the parameter named with "bias" for "weight".
        softmax_scale: for attention, what a sliced block divides q.k by, on weights loaded as they are: "original"
            (1/sqrt of the dense head_dim, kept as the block's own attribute) or "kept" (1/sqrt of the kept head_dim:
            the block derives it from head_dim, so ``resize`` folds sqrt(kept/original) into the query rows to keep
            the original scale); a string or a function of the block. Weights sliced elsewhere under another
            convention are converted by it.
    """

    kind: str
    types: tuple[str, ...]
    rows: tuple[tuple[str, int | Callable[[nn.Module], int]], ...]
    cols: tuple[tuple[str, int | Callable[[nn.Module], int]], ...]
    size: Callable[[nn.Module], int]
    heads: Callable[[nn.Module], int] | None = None
    resize: Callable[[nn.Module, int, int], None] | None = None
    check: Callable[[nn.Module], str | None] | None = None
    at: str = ""
    resize_heads: Callable[[nn.Module, int, int], None] | None = None
    softmax_scale: str | Callable[[nn.Module], str] = "original"

    def resolved_types(self) -> tuple[type, ...]:
        out = []
        for spec in self.types:
            module_name, _, cls_name = spec.partition(":")
            if module_name.split(".")[0] not in sys.modules:
                continue  # the library was never imported, so no model of it exists in this process
            try:
                out.append(getattr(importlib.import_module(module_name), cls_name))
            except (ImportError, AttributeError):
                continue  # another library version without this class
        return tuple(out)


class Adapter:
    """A model family. Give ``name``, ``description`` and ``blocks`` to the constructor, or subclass and override
    ``matches``/``structures`` for a family whose blocks a table cannot describe."""

    def __init__(
        self,
        name: str,
        description: str,
        blocks: tuple[BlockSpec, ...],
        towers: tuple[tuple[str, str], ...] = (("", "vision"),),
    ) -> None:
        """``towers``: (module-name prefix, tower name) pairs, first match wins: which tower each structure is in. A
        prefix matches at the start of the name or after any dot (the model may be wrapped in a parent module)."""
        self.name, self.description, self.blocks, self.towers = name, description, tuple(blocks), tuple(towers)

    def tower_of(self, name: str) -> str:
        dotted = "." + name
        return next((tower for prefix, tower in self.towers if not prefix or "." + prefix in dotted), "other")

    def matches(self, model: nn.Module) -> bool:
        types = tuple(t for spec in self.blocks for t in spec.resolved_types())
        return bool(types) and any(isinstance(m, types) for m in model.modules())

    def structures(self, model: nn.Module, granularity: str = "dim") -> list[Structure]:
        """Every prunable structure of ``model``, in module order. ``granularity`` "head" makes each attention
        structure's elements whole heads instead of head dimensions; "mixed" its (head, dim) pairs, of which a choice
        keeps whole heads x shared head dims."""
        found: list[Structure] = []
        resolved = [(spec, spec.resolved_types()) for spec in self.blocks]
        for name, module in model.named_modules():
            for spec, types in resolved:
                if types and isinstance(module, types):
                    target = module.get_submodule(spec.at) if spec.at else module
                    path = ".".join(p for p in (name, spec.at) if p)
                    structure = self._structure(path, target, spec)
                    if granularity in ("head", "mixed") and spec.kind == "attn":
                        structure = self._as_heads(structure, spec, pairs=granularity == "mixed")
                    found.append(structure)
        return found

    def _as_heads(self, s: Structure, spec: BlockSpec, pairs: bool = False) -> Structure:
        """The same attention with whole heads as its elements: n = heads, B = head_dim, and each slot's groups
        divided by the heads (3 for a fused qkv, 1 for q, k, v or the output projection). With ``pairs`` (mixed
        granularity) its elements are the (head, dim) pairs instead: n = heads x head_dim, B = 1."""
        if spec.resize_heads is None:
            raise UPopError(f"the {self.name} adapter supports head-dimension granularity only ({s.name})")
        heads, head_dim = s.heads, s.size

        def regroup(slots: list[Slot]) -> list[Slot]:
            return [dataclasses.replace(slot, groups=slot.groups // heads) for slot in slots]

        rows, cols = regroup(s.rows), regroup(s.cols)
        if pairs:
            return dataclasses.replace(
                s,
                size=heads * head_dim,
                heads=1,
                rows=rows,
                cols=cols,
                grid=(heads, head_dim),
                resize_heads=spec.resize_heads,
            )
        return dataclasses.replace(
            s, size=heads, block=head_dim, heads=1, rows=rows, cols=cols, resize=spec.resize_heads
        )

    def _structure(self, name: str, module: nn.Module, spec: BlockSpec) -> Structure:
        if spec.check is not None:
            reason = spec.check(module)
            if reason:
                raise UPopError(f"{name} cannot be pruned exactly by the {self.name} adapter: {reason}")

        def slots(pairs):
            out = []
            for child, groups in pairs:
                g = int(groups(module) if callable(groups) else groups)
                path = f"{name}.{child}" if name else child
                owner_name, _, attr = child.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                target = getattr(owner, attr, None)
                if isinstance(target, nn.Linear):
                    out.append(Slot(path, target, g))
                elif isinstance(target, nn.Parameter) and target.dim() == 2 and "weight" in attr:
                    out.append(Slot(path, owner, g, attr, attr.replace("weight", "bias")))
                else:
                    raise UPopError(
                        f"{path} is a {type(target).__name__}, the {self.name} adapter expects a Linear or a 2-D weight"
                    )
            return out

        return Structure(
            name=name,
            kind=spec.kind,
            size=int(spec.size(module)),
            rows=slots(spec.rows),
            cols=slots(spec.cols),
            heads=int(spec.heads(module)) if spec.heads else 0,
            module=module,
            resize=spec.resize,
            tower=self.tower_of(name),
            family=self.name,
            softmax_scale=spec.softmax_scale(module) if callable(spec.softmax_scale) else spec.softmax_scale,
        )


class Composite(Adapter):
    """A model that holds blocks of several families (e.g. BLIP: a ViT and a BERT): the structures of every part, in
    module order. Its name joins the parts' names with "+", so a plan names them all."""

    def __init__(self, parts: list[Adapter]) -> None:
        super().__init__("+".join(a.name for a in parts), "; ".join(a.description for a in parts), ())
        self.parts = parts

    def matches(self, model: nn.Module) -> bool:
        return all(a.matches(model) for a in self.parts)

    def structures(self, model: nn.Module, granularity: str = "dim") -> list[Structure]:
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        found = [s for a in self.parts for s in a.structures(model, granularity)]
        return sorted(found, key=lambda s: order.get(s.name, len(order)))
