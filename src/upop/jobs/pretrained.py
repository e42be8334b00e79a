"""Loading a checkpoint into the model a spec names: a dense one, or a compressed one as the original UPop code saves
it (a single state dict at reduced widths, nothing else): every structure's kept width is read from the tensor
shapes, the architecture is sliced to them, and the weights are loaded as they are, with the attention scale of the
code that wrote them.

The original code slices the same head dims out of every head (and q, k, v alike) and MLP neurons, and stores only
the sliced tensors; which indices it kept does not matter to a loaded model, so the first ones are sliced here.
Its compressed models divide q.k by sqrt of the original head_dim in the ViTs it builds itself (DeiT, BLIP's ViT,
Segmenter) and by sqrt of the kept head_dim in BERT (BLIP's text side) and CLIP; where a block here divides
otherwise, the loaded query rows are scaled by the ratio, so the outputs are the original code's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from upop.adapters import find_adapter
from upop.core import plan as P
from upop.core.structure import Slot, Structure
from upop.data.config import DataConfig
from upop.models import ModelBundle, build
from upop.models.checkpoints import fit_positions, load_state, read_state_dict
from upop.tasks import task_class

# what the original UPop code's compressed models divide q.k by, per family (the adapter that finds the block)
ORIGINAL_UPOP_SCALE = {
    "timm-vit": "original",  # DeiT: its Attention keeps self.scale of the dense head_dim
    "hf-blip": "original",  # BLIP's ViT: likewise
    "segmenter": "original",
    "hf-bert": "kept",  # BLIP's BERT: attention_head_size is set to the kept width, the scale follows it
    "blip-nlvr": "kept",
    "open-clip": "kept",  # CLIP: torch 1.11's multi-head attention divides by sqrt(q.shape[-1])
}


def load_model(
    model: str,
    *,
    task: str,
    pretrained: str | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """The module ``upop evaluate --task TASK --model MODEL --pretrained FILE`` evaluates: the model a ``--model``
    spec names for ``task``, with ``pretrained`` loaded: a dense checkpoint, or a compressed one as the original
    UPop code saves it (its widths read from the tensor shapes). ``image_size`` builds it for another input size
    (position embeddings interpolated); ``num_classes`` sizes a classifier's head (default: the built-in data's).
    The model carries its plan when the checkpoint was compressed, so ``upop.save_compressed`` saves it as a
    compressed directory."""
    return load_bundle(model, task, pretrained, image_size, num_classes).bundle.model


class Loaded:
    """A model spec with a checkpoint loaded: its ``bundle``, whether the checkpoint was ``compressed``, and the kept
    widths read from it (``widths``: one row per structure, in model order)."""

    def __init__(self, bundle: ModelBundle, widths: list[dict[str, Any]]) -> None:
        self.bundle, self.widths = bundle, widths
        self.compressed = any(w["kept"] < w["size"] for w in widths)

    def summary(self) -> dict[str, Any]:
        """What a report says of the checkpoint: compressed or not, and each narrowed structure's kept width."""
        return {"compressed": self.compressed, "structures": [w for w in self.widths if w["kept"] < w["size"]]}


def load_bundle(
    spec: str,
    task: str,
    pretrained: str | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> Loaded:
    """``load_model``'s work, keeping the bundle (tokenizer, normalisation) and what was read from the checkpoint."""
    cls = task_class(task)
    outputs = cls.num_outputs(DataConfig()) if num_classes is None else num_classes
    torch.manual_seed(seed)  # the same initial weights on every rank, for what a checkpoint does not hold
    bundle = build(spec, cls.model_kind, outputs, image_size, weights=pretrained is None)
    if pretrained is None:
        return Loaded(bundle, [])
    return Loaded(bundle, load_pretrained(bundle, pretrained))


def load_pretrained(bundle: ModelBundle, path: str | Path) -> list[dict[str, Any]]:
    """Load the checkpoint at ``path`` into ``bundle.model`` (in place): converted from its code base's keys,
    position embeddings fitted, the model sliced to a compressed checkpoint's widths first. Returns each
    structure's kept and dense width."""
    model = bundle.model
    state = read_state_dict(path)
    if bundle.on_load is not None:
        bundle.on_load(model, state)
    if bundle.convert_state is not None:
        state = bundle.convert_state(state)
    state = fit_positions(state, model.state_dict())
    adapter = find_adapter(model)
    structures = adapter.structures(model, "dim")
    widths = [_width(s, state) for s in structures]
    narrowed = [(s, kept) for s, kept in zip(structures, widths) if kept is not None and kept < s.size]
    if narrowed:
        entries = [_entry(s, kept) for s, kept in narrowed]
        plan = P.Plan(adapter.name, P.fingerprint(model), entries, config={"granularity": "dim", "source": "file"})
        P.apply_plan(model, plan, adapter)
        for s, kept in narrowed:
            _convert_scale(s, kept, state)
    load_state(model, state, f"checkpoint {path}")
    return [
        {"name": s.name, "kind": s.kind, "tower": s.tower, "kept": kept if kept is not None else s.size, "size": s.size}
        | ({"heads": s.heads} if s.kind == "attn" else {})
        for s, kept in zip(structures, widths)
    ]


def _key(slot: Slot) -> str:
    """The state-dict key of a slot's weight: a Linear's ``weight``, or a packed projection's own parameter."""
    return slot.path if slot.weight_name != "weight" else f"{slot.path}.weight"


def _width(s: Structure, state: dict[str, Any]) -> int | None:
    """The kept width of ``s`` in ``state``: rows / groups of every row slot, columns / groups of every column slot,
    when they agree and fit ``s`` (None otherwise, or when ``state`` does not hold them: the strict load then names
    the keys that are missing or of another shape)."""
    found = set()
    for slot, axis in [*((r, 0) for r in s.rows), *((c, 1) for c in s.cols)]:
        tensor = state.get(_key(slot))
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            return None
        n, per = tensor.shape[axis], slot.groups * slot.block
        found.add(n // per if n % per == 0 else -1)
    kept = found.pop() if len(found) == 1 else -1
    return kept if 1 <= kept <= s.size else None


def _entry(s: Structure, kept: int) -> dict[str, Any]:
    return {"name": s.name, "kind": s.kind, "tower": s.tower, "size": s.size, "kept": list(range(kept))}


def _convert_scale(s: Structure, kept: int, state: dict[str, Any]) -> None:
    """Scale the query rows of ``s`` in ``state`` so that this model's attention computes what the original code's
    did: sqrt(kept/original) where the original divided by sqrt(original) and this block divides by sqrt(kept),
    the inverse the other way."""
    source = ORIGINAL_UPOP_SCALE.get(s.family, s.softmax_scale)
    if s.kind != "attn" or source == s.softmax_scale:
        return
    factor = (kept / s.size) ** 0.5 if source == "original" else (s.size / kept) ** 0.5
    query = s.rows[0]
    rows = slice(None) if len(s.rows) == 3 else slice(0, query.groups // 3 * kept)  # separate q, or q of a packed qkv
    key = _key(query)
    state[key] = state[key].clone()
    state[key][rows] *= factor
    bias = key[: -len(query.weight_name)] + query.bias_name
    if isinstance(state.get(bias), torch.Tensor):
        state[bias] = state[bias].clone()
        state[bias][rows] *= factor
