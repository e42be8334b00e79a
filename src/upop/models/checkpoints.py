"""Reading checkpoints safely: a state dict from a local file without executing pickled code, and strict loading
into a model (through the family's key conversion for released checkpoints of other code bases)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from upop.errors import UPopError
from upop.models.bundle import ModelBundle, StateDict


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
            with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing a file
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad header, pickled objects refused by weights_only...
        raise UPopError(
            f"checkpoint {path} is not a readable state dict: {_why_unreadable(path, e)}; UPop reads tensors only "
            "(.safetensors, or a torch file holding a plain state dict, read with weights_only=True; pickled code is "
            "never executed)"
        ) from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UPopError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _why_unreadable(path: Path, error: Exception) -> str:
    """What a file that neither safetensors nor ``torch.load(weights_only=True)`` could read is, from its first
    bytes (torch's own message is long, multi-line and colour-coded)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    if path.suffix == ".safetensors":
        return "its safetensors header is missing or damaged (truncated?)"
    if head.startswith(b"PK\x03\x04"):  # torch's zip format
        if "weights_only" in str(error) or "Unsupported global" in str(error) or "Unsupported operand" in str(error):
            return "it holds pickled Python objects besides tensors"
        return "the torch file is truncated or damaged"
    if head[:1] == b"\x80":  # a bare pickle stream (torch's legacy format or pickle.dump)
        return "it is a pickle of Python objects, not a state dict of tensors"
    return "it is neither a safetensors file nor a torch checkpoint"


def _grid(tokens: int) -> tuple[int, int] | None:
    """(side, extra tokens) when ``tokens`` is a square grid of patches after 0-2 class/distillation tokens."""
    for extra in (1, 2, 0):
        side = round((tokens - extra) ** 0.5)
        if side > 0 and side * side == tokens - extra:
            return side, extra
    return None


def fit_positions(state: dict[str, Any], own: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``state`` with the patch position embeddings of another input size interpolated to ``own``'s grid (bicubic,
    corners not aligned, the class tokens kept: as BLIP, timm and DeiT do when a checkpoint meets another image
    size). A key is a position embedding when its name says so and the two shapes differ in the token count only,
    both a square grid after the same number of extra tokens."""
    out = dict(state)
    for key, value in state.items():
        target = own.get(key)
        if target is None or not isinstance(value, torch.Tensor) or value.shape == target.shape or "pos" not in key:
            continue
        axis = value.dim() - 2  # (tokens, dim) or (1, tokens, dim)
        if value.dim() not in (2, 3) or value.shape[axis + 1] != target.shape[axis + 1]:
            continue
        src, dst = _grid(value.shape[axis]), _grid(target.shape[axis])
        if src is None or dst is None or src[1] != dst[1]:
            continue
        (side, extra), (new_side, _) = src, dst
        flat = value.reshape(-1, value.shape[-1]) if axis == 0 else value[0]
        grid = flat[extra:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
        patches = grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1).to(value.dtype)
        fitted = torch.cat([flat[:extra], patches])
        out[key] = fitted if axis == 0 else fitted[None]
    return out


def load_weights(
    target: ModelBundle | nn.Module, path: str | Path, convert: Callable[[StateDict], StateDict] | None = None
) -> None:
    """Load a local state dict into a model (or a bundle's model), strictly; a mismatch names the first differing
    keys. ``convert`` (a bundle's ``convert_state`` by default) maps a released checkpoint's keys to the model's;
    patch position embeddings of another input size are interpolated."""
    model = target.model if isinstance(target, ModelBundle) else target
    state = read_state_dict(path)
    if isinstance(target, ModelBundle) and target.on_load is not None:
        target.on_load(model, state)
    convert = convert or (target.convert_state if isinstance(target, ModelBundle) else None)
    if convert is not None:
        state = convert(state)
    load_state(model, fit_positions(state, model.state_dict()), f"checkpoint {path}")


def load_state(model: nn.Module, state: StateDict, what: str) -> None:
    """Load ``state`` into ``model``, strictly: ``what`` (e.g. "checkpoint FILE") names the source when a key is
    missing, unexpected or of another shape."""
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
        raise UPopError(f"{what} is not a state dict of this {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state)
