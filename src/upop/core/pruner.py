"""The Pruner: attaches masks, accumulates their gradients, ranks every element in one budget, sets the masks on the
progressive schedule, and compresses the model. It is the only stateful part of the core and names no model family:
it is given the adapter that locates the model's structures (``upop.Pruner`` looks it up in the registry)."""

from __future__ import annotations

import copy
import functools
import math
import types
from typing import Any

import torch
from torch import nn

from upop.core.adapter import Adapter
from upop.core.config import PruneConfig
from upop.core.importance import Importance, standardised
from upop.core.plan import Plan, fingerprint
from upop.core.profile import batch_size_of, count_tokens
from upop.core.ranking import Cost, fewest_kept, pi_at, removed_cost, select, selected_value, total_cost
from upop.core.stability import Stability
from upop.core.structure import Slot, Structure, grid_factors, slice_structure
from upop.core.widths import Alignment, resolve_alignment, structure_costs
from upop.errors import UPopError
from upop.utils.dist import average, broadcast_from_main

STATE_VERSION = 1


def _masked_forward(module: nn.Module, *args: Any, mask: torch.Tensor, slot: Slot, **kwargs: Any) -> Any:
    """Forward of a module whose projection ``slot`` (output rows laid out (groups, n, block)) is scaled by ``mask``
    (n,).

    The mask scales the weight rows and bias instead of the output: (x W^T + b) * m == x (W * m)^T + b * m, but the
    extra work and memory are weight-sized rather than activation-sized, and the mask gradient comes from the weight
    gradient the backward computes anyway. The masked tensors stand in for the parameters during the class's own
    forward (so a packed ``in_proj_weight`` is masked the same way as a Linear's weight). Multiplying by 1.0 is exact,
    so masks at 1 leave outputs bitwise unchanged.
    """
    params = module._parameters
    weight, bias = params[slot.weight_name], params.get(slot.bias_name)
    m = mask.to(dtype=weight.dtype, device=weight.device)
    layout = (slot.groups, m.numel(), slot.block)  # the mask broadcast over groups and block: one multiply, no copies
    params[slot.weight_name] = (weight.view(*layout, -1) * m.view(1, -1, 1, 1)).view(weight.shape)
    if bias is not None:
        params[slot.bias_name] = (bias.view(layout) * m.view(1, -1, 1)).view(bias.shape)
    try:
        return type(module).forward(module, *args, **kwargs)
    finally:
        params[slot.weight_name] = weight
        if bias is not None:
            params[slot.bias_name] = bias


def _attach_mask(slot: Slot, mask: torch.Tensor) -> None:
    # A method bound to the module (not a closure over it): a deep copy of the model binds to the copied module.
    # The slot is copied without its module so that the bound method does not keep the original alive.
    bare = Slot(slot.path, None, slot.groups, slot.weight_name, slot.bias_name, slot.block)  # type: ignore[arg-type]
    slot.module.forward = types.MethodType(functools.partial(_masked_forward, mask=mask, slot=bare), slot.module)


def unmasked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without the masks a Pruner attached to it: the same weights, the dense forward (e.g.
    the momentum model of a momentum-distillation loss, which the paper keeps unmasked). A model without masks is
    simply copied."""
    pruner = model.__dict__.get("_upop_pruner")
    copied = copy.deepcopy(model, {id(pruner): None} if pruner is not None else {})
    copied.__dict__.pop("_upop_pruner", None)
    for module in copied.modules():
        bound = vars(module).get("forward")
        if isinstance(bound, types.MethodType) and getattr(bound.__func__, "func", None) is _masked_forward:
            del vars(module)["forward"]
    return copied


class Pruner:
    """UPop's search on a model whose structures ``adapter`` locates: the state of one search (masks, accumulated
    gradients, the current choice, the step) and what it does at each step. ``upop.Pruner`` is this class with the
    adapter found in the registry of families; its docstring says how to use it.

    Args:
        model: the dense model (a DDP wrapper is unwrapped), changed in place.
        config: the search configuration.
        example_inputs: a batch as the model takes it; needed for ``cost="flops"``/``"latency"``, and the shape the
            widths of ``align="auto"`` are measured at.
        adapter: the adapter that locates the model's structures.
        precisions: what ``align="auto"`` measures in ("fp32", "bf16", "fp16").
    """

    def __init__(
        self,
        model: nn.Module,
        config: PruneConfig | None = None,
        example_inputs: Any = None,
        adapter: Adapter | None = None,
        precisions: tuple[str, ...] | None = None,
    ) -> None:
        model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if getattr(model, "_upop_pruner", None) is not None:
            raise UPopError("this model already has a Pruner attached; call detach() on it first")
        if not isinstance(adapter, Adapter):
            raise UPopError("the core Pruner is given its adapter; upop.Pruner finds it in the registry")
        self.model, self.adapter = model, adapter
        self.config = config or PruneConfig()
        self.config.check_schedule()
        self.fingerprint = fingerprint(model)
        self.structures: list[Structure] = self._searched_structures()
        device = next(model.parameters()).device
        self.masks = [torch.ones(s.size, device=device, requires_grad=True) for s in self.structures]
        self.accumulated = Importance(self.structures, {"attn": self.config.w_attn, "mlp": self.config.w_mlp}, device)
        self._penalised = False
        self.stability = Stability()
        self.chosen = [torch.zeros(s.size, dtype=torch.bool) for s in self.structures]
        self._measure(device, example_inputs, precisions)
        self.interval = self.config.rank_interval()
        self.step_count = 0
        self.skipped_steps = 0  # steps whose mask gradients were not finite (not accumulated)
        self.pi = 0.0
        self._patched: list[nn.Module] = []
        self._attach()
        model._upop_pruner = self

    def _searched_structures(self) -> list[Structure]:
        """The adapter's structures of the model that the configuration does not exclude (or restrict to towers)."""
        found = self.adapter.structures(self.model, self.config.granularity)
        towers = sorted({s.tower for s in found})
        unknown = [t for t in self.config.towers if t not in towers]
        if unknown:
            raise UPopError(
                f"this {type(self.model).__name__} has no tower {unknown[0]!r}; its towers: {', '.join(towers)}"
            )
        kept = [s for s in found if self.config.searches(s)]
        if not kept:
            raise UPopError(
                f"no prunable structure left in the {type(self.model).__name__} (all excluded or none found)"
            )
        return kept

    def _measure(self, device: torch.device, example_inputs: Any, precisions: tuple[str, ...] | None) -> None:
        """Token counts, element costs, the alignment and the floor the ranking uses."""
        if self.config.cost in ("flops", "latency") and example_inputs is None:
            raise UPopError(
                f'cost="{self.config.cost}" needs example_inputs (a batch as the model takes it) for the token counts'
            )
        batch = batch_size_of(example_inputs) if example_inputs is not None else None
        if example_inputs is not None:
            count_tokens(self.model, self.structures, example_inputs)
        self.costs: list[Cost]
        self.costs, self.latency_tables = structure_costs(self.structures, self.config, device, batch)
        self.alignment: Alignment = resolve_alignment(self.structures, self.config, device, batch, precisions)
        self.floor = self._fit_floor()  # the floor the ranking uses (the configured one unless p needs less)

    def _attach(self) -> None:
        """Masks are attached by giving each row linear an instance-level forward (the class and the model's source
        are untouched); ``detach`` deletes it, restoring the class's forward."""
        for structure, mask in zip(self.structures, self.masks):
            for slot in structure.rows:
                if "forward" in vars(slot.module):
                    self.detach()
                    raise UPopError(f"{slot.path} already has an instance-level forward (another tool's patch)")
                _attach_mask(slot, mask)
                self._patched.append(slot.module)

    @property
    def importance(self) -> list[torch.Tensor]:
        """Per structure, the accumulated mask gradient of each element (n_i,)."""
        return self.accumulated.per_structure()

    # ----------------------------------------------------------------------------------------------- search loop
    def sparsity_loss(self) -> torch.Tensor:
        """w_attn * sum |attention masks| + w_mlp * sum |MLP masks| (a scalar tensor to add to the task loss)."""
        self._penalised = True
        total = self.masks[0].new_zeros(())
        for kind, weight in (("attn", self.config.w_attn), ("mlp", self.config.w_mlp)):
            masks = [m for m, s in zip(self.masks, self.structures) if s.kind == kind]
            if masks:  # one concatenation per kind: a few ops per step, not a few per structure
                total = total + weight * torch.cat(masks).abs().sum()
        return total

    def step(self, grad_scale: float = 1.0, skip: bool = False) -> None:
        """Call once after every optimizer step: accumulate the mask gradients of this step (averaged over ranks);
        every ``interval`` steps and at the last step, re-rank all elements and set the masks to the schedule.
        ``grad_scale``: the loss scale of an fp16 grad scaler, divided out of the mask gradients. ``skip``: the
        training step was not taken (non-finite loss or gradients); its mask gradients are not accumulated either.
        Skipped steps, and steps whose mask gradients are not finite, are counted in ``skipped_steps``."""
        grads = torch.cat(
            [m.grad.reshape(-1).float() if m.grad is not None else torch.zeros_like(m).reshape(-1) for m in self.masks]
        )
        if grad_scale != 1.0:
            grads /= grad_scale
        for m in self.masks:
            m.grad = None
        self._penalised, penalised = False, self._penalised
        average(grads)
        if not skip and torch.isfinite(grads).all():
            signs = torch.cat([m.detach().reshape(-1) for m in self.masks]).sign() if penalised else None
            self.accumulated.add(grads, signs)
        else:
            self.skipped_steps += 1  # a NaN/inf step must not corrupt the ranking
        self.step_count += 1
        t, total = self.step_count, self.config.total_steps
        if t <= total and (t % self.interval == 0 or t == total):
            self.update_masks()

    def scores(self) -> list[torch.Tensor]:
        """Per structure, the standardised score of each element (larger = less important): the accumulated mask
        gradient (score="gradient"), minus the root mean square of the task-loss part of the step gradients
        ("fisher"), or that part's sum over its standard error ("snr"); standardised per kind (and per tower, or per
        structure, as configured)."""
        raw = self.accumulated.raw(self.config.score)
        return standardised(raw, self.structures, self.config.standardise)

    def floors(self, floor: float | None = None) -> list[int]:
        """Per structure, the fewest elements it keeps: ceil(floor x (1 - p) x n), at least 1 (``floor``: the
        effective floor by default)."""
        share = (self.floor if floor is None else floor) * (1.0 - self.config.p)
        return [max(1, math.ceil(share * s.size - 1e-9)) for s in self.structures]

    def _fit_floor(self) -> float:
        """The configured floor, or the largest lower one that leaves p of the cost to remove. With linear costs
        every floor in [0, 1] does; a latency curve has a part no width removes, so high floors may not."""
        total = sum(total_cost(c, s.size) for c, s in zip(self.costs, self.structures))
        need = 0.99 * self.config.p * total

        def removable(floor: float) -> float:
            keep = self.floors(floor)
            fewest = [fewest_kept(s.size, self.alignment.of(s.kind), k, s.grid) for s, k in zip(self.structures, keep)]
            return float(
                sum(removed_cost(c, s.size, s.size - f) for c, s, f in zip(self.costs, self.structures, fewest))
            )

        if self.config.allocation == "uniform" or removable(self.config.floor) >= need:
            return self.config.floor
        low, high = 0.0, self.config.floor
        for _ in range(20):
            middle = (low + high) / 2
            low, high = (middle, high) if removable(middle) >= need else (low, middle)
        return low

    def update_masks(self) -> None:
        """Rank every element of every structure in one budget at the current step and set the masks."""
        self.pi = pi_at(self.step_count, self.config.total_steps, self.config.p)
        scores = self.scores()
        align = [self.alignment.of(s.kind) for s in self.structures]
        keep = self.floors()
        grids = [s.grid for s in self.structures]
        chosen: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)] * len(self.structures)
        for group in self.budget_groups():  # one ranking per group, each removing pi of its own cost
            z, c, a, k, g = ([v[i] for i in group] for v in (scores, self.costs, align, keep, grids))
            picked = select(z, c, self.pi, a, k, g)
            for i, c in zip(group, picked):
                chosen[i] = c
        # all ranks hold the same averaged importance; broadcasting rank 0's decision makes identity certain
        flat = broadcast_from_main(torch.cat(chosen).to(torch.uint8).to(self.masks[0].device))
        chosen = list(torch.split(flat.cpu().bool(), [s.size for s in self.structures]))
        self.stability.record(self.step_count, self.pi, torch.cat(scores), torch.cat(self.chosen), torch.cat(chosen))
        self.set_choice(chosen, selected_value(self.pi, self.config.p))

    def budget_groups(self) -> list[list[int]]:
        """The structures (indices) that share one ranking and one budget: all of them ("unified"), each tower's
        ("tower") or each structure alone ("uniform")."""
        if self.config.allocation == "uniform":
            return [[i] for i in range(len(self.structures))]
        if self.config.allocation == "tower":
            towers = sorted({s.tower for s in self.structures})
            return [[i for i, s in enumerate(self.structures) if s.tower == t] for t in towers]
        return [list(range(len(self.structures)))]

    def stability_summary(self) -> dict[str, Any]:
        """The final ranking's stability: the overlap of the chosen sets and the rank correlation of the scores at
        the last two re-rankings, the smallest kept fraction of any structure, and the warnings they call for."""
        return self.stability.summary(self.structures, self.chosen, self.config, self.floor)

    def set_choice(self, chosen: list[torch.Tensor], value: float) -> None:
        """Mark ``chosen`` (per structure, bool (n_i,)) for pruning and set their masks to ``value``, the rest to 1."""
        if len(chosen) != len(self.structures) or any(c.numel() != s.size for c, s in zip(chosen, self.structures)):
            raise UPopError("a choice needs one bool tensor per structure, of the structure's size")
        for c, s in zip(chosen, self.structures):
            if s.grid is not None:  # mixed granularity: whole heads x shared dims, or slicing could not match
                grid_factors(s, (~c.detach().cpu().bool()).nonzero().squeeze(1))
        self.chosen = [c.detach().cpu().bool() for c in chosen]
        with torch.no_grad():
            for mask, c in zip(self.masks, self.chosen):
                mask.fill_(1.0)
                mask[c.to(mask.device)] = value

    # --------------------------------------------------------------------------------------------------- reports
    def kept_fraction(self, kind: str | None = None) -> float:
        """Fraction of elements (of one kind, or all) not chosen for pruning."""
        sel = [c for c, s in zip(self.chosen, self.structures) if kind is None or s.kind == kind]
        total = sum(c.numel() for c in sel)
        return 1.0 - sum(int(c.sum()) for c in sel) / total if total else 1.0

    def pruned_cost_fraction(self) -> float:
        """The fraction of the total prunable cost that the chosen elements hold."""
        total = sum(total_cost(c, s.size) for c, s in zip(self.costs, self.structures))
        removed = [removed_cost(c, s.size, int(ch.sum())) for c, s, ch in zip(self.costs, self.structures, self.chosen)]
        return float(sum(removed)) / total

    def finished(self) -> bool:
        return self.step_count >= self.config.total_steps

    def kept_by_tower(self) -> dict[str, float]:
        """Fraction of elements not chosen for pruning per kind and tower (``attn_vision``, ``mlp_text``...)."""
        out = {}
        for tower in sorted({s.tower for s in self.structures}):
            for kind in ("attn", "mlp"):
                sel = [c for c, s in zip(self.chosen, self.structures) if (s.kind, s.tower) == (kind, tower)]
                total = sum(c.numel() for c in sel)
                if total:
                    out[f"{kind}_{tower}"] = 1.0 - sum(int(c.sum()) for c in sel) / total
        return out

    def log_record(self) -> dict[str, Any]:
        """pi, the kept fractions per kind (and per kind and tower for a model of several towers), the pruned share
        of the cost and the skipped steps, at this step."""
        record: dict[str, Any] = {
            "step": self.step_count,
            "pi": self.pi,
            "kept_attn": self.kept_fraction("attn"),
            "kept_mlp": self.kept_fraction("mlp"),
            "pruned_cost": self.pruned_cost_fraction(),
            "skipped_steps": self.skipped_steps,
        }
        if len({s.tower for s in self.structures}) > 1:
            record["kept_by_tower"] = self.kept_by_tower()
        return record

    # ------------------------------------------------------------------------------------------------ lifecycle
    def detach(self) -> nn.Module:
        """Remove the masks; the model is exactly as it was before the Pruner (weights are trained, not masked)."""
        for linear in self._patched:
            vars(linear).pop("forward", None)
        self._patched.clear()
        self.model.__dict__.pop("_upop_pruner", None)
        return self.model

    def plan(self) -> Plan:
        """The plan of the current decision: kept indices per structure."""
        return Plan(
            adapter=self.adapter.name,
            fingerprint=self.fingerprint,
            structures=[
                {
                    "name": s.name,
                    "kind": s.kind,
                    "tower": s.tower,
                    "size": s.size,
                    "kept": (~c).nonzero().squeeze(1).tolist(),
                    **({"grid": list(s.grid)} if s.grid is not None else {}),
                }
                for s, c in zip(self.structures, self.chosen)
            ],
            config=self.config.to_dict(),
        )

    def compress(self, force: bool = False) -> nn.Module:
        """Slice the weights to the kept elements and remove the masks. Returns the (same, now smaller) model, with
        its plan attached for ``save_compressed``.

        Raises UPopError before the search has finished (masks not yet exactly 0/1), unless ``force`` (then the
        current choice is applied and outputs change)."""
        if not force and not self.finished():
            raise UPopError(
                f"the search has run {self.step_count} of {self.config.total_steps} steps; its masks are not yet "
                "exactly 0/1 (pass force=True to compress anyway)"
            )
        plan = self.plan()
        self.detach()
        for s, entry in zip(self.structures, plan.structures):
            slice_structure(s, torch.tensor(entry["kept"], dtype=torch.long))
        self.model._upop_plan = plan
        return self.model

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and counters to resume a search (no pickled objects needed)."""
        return {
            "version": STATE_VERSION,
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "pi": self.pi,
            "masks": [m.detach().cpu().clone() for m in self.masks],
            **self.accumulated.state_dict(),
            **self.stability.state_dict(),
            "chosen": [c.clone() for c in self.chosen],
            "alignment": [self.alignment.attn, self.alignment.mlp],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or len(state["masks"]) != len(self.masks):
            raise UPopError("the Pruner state does not belong to this model or this UPop version")
        self.step_count, self.skipped_steps, self.pi = int(state["step"]), int(state["skipped_steps"]), state["pi"]
        with torch.no_grad():
            for dst, src in zip(self.masks, state["masks"]):
                dst.copy_(src)
        self.accumulated.load_state_dict(state)
        self.stability.load_state_dict(state)
        self.chosen = [c.clone().bool() for c in state["chosen"]]
        if "alignment" in state:  # the resumed search keeps the widths it measured, not a new measurement
            self.alignment.attn, self.alignment.mlp = (int(v) for v in state["alignment"])
            self.floor = self._fit_floor()

    def latency_summary(self) -> dict[str, float] | None:
        """For cost="latency": the structures' measured time dense, kept, and the target (ms per example batch)."""
        if self.config.cost != "latency":
            return None
        dense = sum(float(c[s.size]) for c, s in zip(self.costs, self.structures))
        kept = sum(float(c[s.size - int(ch.sum())]) for c, s, ch in zip(self.costs, self.structures, self.chosen))
        prunable = sum(total_cost(c, s.size) for c, s in zip(self.costs, self.structures))
        return {"dense_ms": 1e3 * dense, "kept_ms": 1e3 * kept, "target_ms": 1e3 * (dense - self.config.p * prunable)}
