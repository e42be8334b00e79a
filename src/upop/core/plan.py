"""Plans: the serialisable result of a search (kept indices per structure + the base architecture's fingerprint),
and saving/loading a compressed model as plan.json + model.safetensors."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from upop.core.adapter import Adapter
from upop.core.structure import Structure, grid_factors, slice_structure
from upop.errors import UPopError
from upop.utils.files import atomic_write

PLAN_FORMAT = "upop-plan"
PLAN_VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Module names and shapes of ``model``'s state (its architecture), with a sha256 over them."""
    entries = [[name, list(t.shape)] for name, t in model.state_dict().items()]
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return {"sha256": digest, "entries": entries}


def fingerprint_mismatch(expected: dict[str, Any], model: nn.Module, limit: int = 3) -> str | None:
    """None if ``model`` has the architecture ``expected``; else a description naming the first differing keys."""
    actual = fingerprint(model)
    if actual["sha256"] == expected["sha256"]:
        return None
    want = {n: s for n, s in expected["entries"]}
    have = {n: s for n, s in actual["entries"]}
    diffs = []
    for name in list(want) + [n for n in have if n not in want]:
        if want.get(name) != have.get(name):
            w = "missing" if name not in want else "x".join(map(str, want[name])) or "scalar"
            h = "missing" if name not in have else "x".join(map(str, have[name])) or "scalar"
            diffs.append(f"{name} (plan: {w}, model: {h})")
    return ", ".join(diffs[:limit]) + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


@dataclass
class Plan:
    """Kept indices per structure, the adapter that located them, and the dense model's fingerprint."""

    adapter: str
    fingerprint: dict[str, Any]
    structures: list[dict[str, Any]]  # {"name", "kind", "size" (dense), "kept": [indices]}
    config: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "adapter": self.adapter,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "structures": self.structures,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != PLAN_FORMAT or not isinstance(d.get("version"), int):
            raise UPopError("not a UPop plan (expected format 'upop-plan' with an integer version)")
        if d["version"] > PLAN_VERSION:
            raise UPopError(f"plan version {d['version']} is newer than this UPop reads ({PLAN_VERSION}); upgrade UPop")
        try:
            return cls(d["adapter"], d["fingerprint"], d["structures"], d.get("config", {}), d["version"])
        except KeyError as e:
            raise UPopError(f"the plan lacks the field {e.args[0]!r}") from None

    def kept_fraction(self, kind: str) -> float:
        sel = [s for s in self.structures if s["kind"] == kind]
        total = sum(s["size"] for s in sel)
        return sum(len(s["kept"]) for s in sel) / total if total else 1.0


def plan_kept(structures: list[Structure], plan: Plan) -> list[torch.Tensor]:
    """Per structure, the indices the plan keeps (all of them where the plan does not name the structure). The one
    check of a plan against a model's structures: raises UPopError when the plan names a structure that is not among
    ``structures``, or sizes or indices that do not fit, or (mixed granularity) kept pairs that are not whole heads x
    shared dims."""
    entries = {e["name"]: e for e in plan.structures}
    unknown = sorted(set(entries) - {s.name for s in structures})
    if unknown:
        raise UPopError(
            f"the plan names {unknown[0]!r}, which is not among this model's structures (or the search excludes it)"
        )
    kept = []
    for s in structures:
        entry = entries.get(s.name, {"size": s.size, "kept": list(range(s.size))})
        indices = entry["kept"]
        if entry["size"] != s.size or not indices or not all(isinstance(k, int) and 0 <= k < s.size for k in indices):
            raise UPopError(
                f"the plan's {s.name} does not fit this model: it has {s.size} elements and a plan keeps 1 to "
                f"{s.size} of them (indices 0..{s.size - 1}); the plan says size {entry['size']}"
            )
        keep = torch.tensor(indices, dtype=torch.long)
        if s.grid is not None:
            grid_factors(s, keep)  # whole heads x shared dims, or refused here
        kept.append(keep)
    return kept


def plan_choice(structures: list[Structure], plan: Plan) -> list[torch.Tensor]:
    """The plan as a Pruner's choice over ``structures``: per structure a bool tensor, True = pruned (checked by
    ``plan_kept``)."""
    chosen = []
    for s, keep in zip(structures, plan_kept(structures, plan)):
        c = torch.ones(s.size, dtype=torch.bool)
        c[keep] = False
        chosen.append(c)
    return chosen


def check_base(plan: Plan, model: nn.Module, what: str) -> None:
    """Refuse a ``model`` whose architecture is not the plan's base (``what`` names the model in the message)."""
    mismatch = fingerprint_mismatch(plan.fingerprint, model)
    if mismatch:
        raise UPopError(f"the plan was made for another architecture than this {what}: {mismatch}")


def apply_plan(model: nn.Module, plan: Plan, adapter: Adapter) -> nn.Module:
    """Slice a fresh dense ``model`` (in place) to the plan's architecture, its structures located by ``adapter``
    (the one named in the plan: ``upop.apply_plan`` looks it up). The weights are the dense model's until the
    compressed weights are loaded. Raises UPopError naming the first mismatching keys if the architecture differs
    from the plan's base."""
    check_base(plan, model, type(model).__name__)
    structures = adapter.structures(model, plan.config.get("granularity", "dim"))
    named = {e["name"] for e in plan.structures}
    for s, keep in zip(structures, plan_kept(structures, plan)):
        if s.name in named:
            slice_structure(s, keep)
    model._upop_plan = plan
    return model


def save_compressed(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``directory``/plan.json and ``directory``/model.safetensors for a model returned by
    ``Pruner.compress`` or ``load_compressed``. Each file is written atomically."""
    model = getattr(model, "module", model)
    plan: Plan | None = getattr(model, "_upop_plan", None)
    if plan is None:
        raise UPopError("this model carries no UPop plan: save the model returned by Pruner.compress()")
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UPopError(f"cannot create the output directory {out}: {e.strerror}") from None
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # tied weights (an LM head sharing the word embeddings) saved apart
        v = v.detach().contiguous().cpu()
        state[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    atomic_write(out / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
    atomic_write(out / PLAN_FILE, json.dumps(plan.to_dict(), indent=1, sort_keys=True).encode())
    return out


def read_plan(directory: str | os.PathLike) -> Plan:
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        raise UPopError(f"{directory} is not a compressed model directory: {PLAN_FILE} is missing")
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise UPopError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While inside, every parameter a module registers is moved to the meta device at once: a model is built with
    its architecture and buffers but without memory (or initialisation work) for its weights. Buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def load_compressed(
    model: nn.Module | Callable[[], nn.Module],
    directory: str | os.PathLike,
    adapter_for: Callable[[nn.Module, str], Adapter],
) -> nn.Module:
    """Apply the plan in ``directory`` to a model of the dense architecture and load the compressed weights
    (safetensors; nothing is unpickled). Returns the compressed model. ``adapter_for(model, name)`` gives the adapter
    the plan names (``upop.load_compressed`` looks it up in the registry).

    ``model`` is a fresh dense model (changed in place), or a function that builds one: it is then built with its
    parameters on the meta device, so no dense weights are allocated or read, and the compressed weights are loaded
    in their place (``upop.load_compressed(directory)`` does this for a directory written by ``upop compress``)."""
    plan = read_plan(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise UPopError(f"{directory} has a plan but no {WEIGHTS_FILE}")
    if not isinstance(model, nn.Module):
        with parameters_on_meta():
            model = model()
    model = apply_plan(model, plan, adapter_for(model, plan.adapter))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UPopError(f"{weights} is not a readable safetensors file: {e}") from None
    on_meta = any(p.is_meta for p in model.parameters())
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=on_meta)
    except RuntimeError as e:
        raise UPopError(f"{weights} does not fit the plan: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UPopError(f"{weights} does not fit the plan: missing {missing[:3]}, unexpected {unexpected[:3]}")
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise UPopError(f"{weights} holds no values for {', '.join(left[:3])}")
    return model
