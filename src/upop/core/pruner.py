"""The Pruner: attaches masks, accumulates their gradients, ranks every element in one budget, sets the masks on the
progressive schedule, and compresses the model. It is the only stateful part of the core and names no model family."""

from __future__ import annotations

import functools
import math
import types
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from upop.adapters import find_adapter
from upop.config import PruneConfig
from upop.core.plan import Plan, fingerprint
from upop.core.profile import batch_size_of, call_model
from upop.core.ranking import (
    Cost,
    fewest_kept,
    pi_at,
    removed_cost,
    select,
    selected_value,
    standardise,
    total_cost,
)
from upop.core.structure import Slot, Structure, grid_factors, slice_structure
from upop.core.widths import Alignment, latency_curves, measure_alignment
from upop.errors import UPopError

STATE_VERSION = 1
STARVED_SHARE = 0.25  # a structure keeping under this fraction of the uniform share 1 - p is reported as starved
SETTLED = 0.9  # the ranking had settled when the last two re-rankings agree this much (overlap and rank correlation)


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors (ties broken by position)."""
    ra = torch.argsort(torch.argsort(a, stable=True)).double()
    rb = torch.argsort(torch.argsort(b, stable=True)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else 1.0


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


class Pruner:
    """UPop on ``model``, changed in place: one mask per attention module (length head_dim, shared by all heads and
    by q, k, v) and per MLP (length hidden), applied to the rows of the q/k/v (or fused qkv) and first MLP linears
    (the model's source is not edited; ``detach`` restores it exactly).

    Use::

        pruner = Pruner(model, PruneConfig(p=0.5, total_steps=T))
        loss = task_loss + pruner.sparsity_loss(); loss.backward(); optimizer.step(); optimizer.zero_grad()
        pruner.step()                # after every optimizer step
        model = pruner.compress()    # after T steps

    The masks are not parameters of the model, so no optimizer sees them, whenever it is built. Their gradients are
    read, averaged over DDP ranks and accumulated by ``step``; ``scores`` turns them into the ranking's scores
    (``config.score``: by default an element whose mask gradient has the smaller root mean square is less important;
    the paper's "gradient": a larger accumulated gradient is), ``stability_summary`` says how settled it was.

    Args:
        model: the dense model (a DDP wrapper is unwrapped).
        config: the search configuration.
        example_inputs: a batch as the model takes it (tensor, tuple or dict); needed for ``cost="flops"``, and the
            shape the widths of ``align="auto"`` are measured at (a default shape without it).
        adapter: an adapter name to force; by default the registry picks the one matching the model.
        precisions: what ``align="auto"`` measures in ("fp32", "bf16", "fp16"); default fp32 and the device's half
            precision on a GPU (where models are usually deployed in it), fp32 on a CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        config: PruneConfig | None = None,
        example_inputs: Any = None,
        adapter: str | None = None,
        precisions: tuple[str, ...] | None = None,
    ) -> None:
        model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if getattr(model, "_upop_pruner", None) is not None:
            raise UPopError("this model already has a Pruner attached; call detach() on it first")
        self.model = model
        self.config = config or PruneConfig()
        self.config.check_schedule()
        self.adapter = find_adapter(model, adapter)
        self.fingerprint = fingerprint(model)
        found = self.adapter.structures(model, self.config.granularity)
        towers = sorted({s.tower for s in found})
        unknown = [t for t in self.config.towers if t not in towers]
        if unknown:
            raise UPopError(f"this {type(model).__name__} has no tower {unknown[0]!r}; its towers: {', '.join(towers)}")
        self.structures: list[Structure] = [
            s
            for s in found
            if not self.config.excludes(s.name) and (not self.config.towers or s.tower in self.config.towers)
        ]
        if not self.structures:
            raise UPopError(f"no prunable structure left in the {type(model).__name__} (all excluded or none found)")
        device = next(model.parameters()).device
        self.masks = [torch.ones(s.size, device=device, requires_grad=True) for s in self.structures]
        # one flat fp32 accumulator; the per-structure entries are views of it, so a step adds once
        self._importance = torch.zeros(sum(s.size for s in self.structures), dtype=torch.float32, device=device)
        self.importance = list(torch.split(self._importance, [s.size for s in self.structures]))
        # score="fisher" / "snr": sum and sum of squares of the task-loss part of the step gradients (the L1 penalty's
        # known gradient, w * sign(m) per kind, taken out when sparsity_loss() was in the step's loss)
        self._task_sum = torch.zeros_like(self._importance)
        self._task_sq = torch.zeros_like(self._importance)
        weights = {"attn": self.config.w_attn, "mlp": self.config.w_mlp}
        self._penalty = torch.cat([torch.full((s.size,), weights[s.kind], device=device) for s in self.structures])
        self._penalised = False
        self.accumulated_steps = 0
        self.stability: list[dict[str, float]] = []  # one record per re-ranking: how much the decision moved
        self._last_scores: torch.Tensor | None = None
        self.chosen = [torch.zeros(s.size, dtype=torch.bool) for s in self.structures]
        if self.config.cost in ("flops", "latency") and example_inputs is None:
            raise UPopError(
                f'cost="{self.config.cost}" needs example_inputs (a batch as the model takes it) for the token counts'
            )
        if example_inputs is not None:
            self._count_tokens(example_inputs)
        self.latency_tables: dict[str, Any] = {}
        self.costs: list[Cost] = self._costs(device, example_inputs)
        self.alignment = self._alignment(device, example_inputs, precisions)
        self.floor = self._fit_floor()  # the floor the ranking uses (the configured one unless p needs less)
        self.interval = self.config.rank_interval()
        self.step_count = 0
        self.skipped_steps = 0  # steps whose mask gradients were not finite (not accumulated)
        self.pi = 0.0
        # Masks are attached by giving each row linear an instance-level forward (the class and the model's source
        # are untouched); detach() deletes it, restoring the class's forward.
        self._patched: list[nn.Linear] = []
        for structure, mask in zip(self.structures, self.masks):
            for slot in structure.rows:
                if "forward" in vars(slot.module):
                    self.detach()
                    raise UPopError(f"{slot.path} already has an instance-level forward (another tool's patch)")
                _attach_mask(slot, mask)
                self._patched.append(slot.module)
        model._upop_pruner = self

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
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(grads, op=dist.ReduceOp.SUM)
            grads /= dist.get_world_size()
        if not skip and torch.isfinite(grads).all():
            self._importance += grads
            if penalised:
                task = grads - self._penalty * torch.cat([m.detach().reshape(-1) for m in self.masks]).sign()
            else:
                task = grads
            self._task_sum += task
            self._task_sq.addcmul_(task, task)
            self.accumulated_steps += 1
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
        raw = self._importance.double().cpu()
        if self.config.score == "fisher" and self.accumulated_steps > 0:
            raw = -(self._task_sq.double().cpu() / self.accumulated_steps).sqrt()  # a larger RMS is more important
        elif self.config.score == "snr" and self.accumulated_steps > 1:
            n, total = self.accumulated_steps, self._task_sum.double().cpu()
            spread = (self._task_sq.double().cpu() - total * total / n).clamp(min=0).sqrt()
            raw = total / spread.clamp(min=1e-12 * float(spread.max().clamp(min=1e-30)))
        parts = torch.split(raw, [s.size for s in self.structures])
        scope = self.config.standardise
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.structures):
            key = (s.kind,) if scope == "kind" else (s.kind, s.tower) if scope == "tower" else (i,)
            groups.setdefault(key, []).append(i)
        scores: list[torch.Tensor] = [torch.empty(0)] * len(self.structures)
        for idx in groups.values():
            for i, z in zip(idx, standardise([parts[i] for i in idx])):
                scores[i] = z
        return scores

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
        if self.config.allocation == "uniform":  # the same ratio in every structure, ranked within it
            chosen = [
                select([z], [c], self.pi, [a], [k], [g])[0]
                for z, c, a, k, g in zip(scores, self.costs, align, keep, grids)
            ]
        else:
            chosen = select(scores, self.costs, self.pi, align, keep, grids)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # all ranks hold the same averaged importance; broadcasting rank 0's decision makes identity certain
            flat = torch.cat(chosen).to(torch.uint8)
            flat = flat.to(self.masks[0].device)
            dist.broadcast(flat, src=0)
            chosen = list(torch.split(flat.cpu().bool(), [s.size for s in self.structures]))
        self._record_stability(torch.cat(scores), torch.cat(chosen))
        self.set_choice(chosen, selected_value(self.pi, self.config.p))

    def _record_stability(self, scores: torch.Tensor, chosen: torch.Tensor) -> None:
        """How much this re-ranking moved from the previous one: the share of the elements chosen then that are
        still chosen (1.0 = the ranking only grew its chosen set, as pi rose), and the rank correlation of all
        scores."""
        before = torch.cat(self.chosen)
        record = {"step": self.step_count, "pi": self.pi, "chosen": int(chosen.sum())}
        if self._last_scores is not None:
            record["overlap"] = float((before & chosen).sum()) / max(1, int(before.sum())) if before.any() else 1.0
            record["rank_correlation"] = _rank_correlation(self._last_scores, scores)
        self._last_scores = scores
        self.stability.append(record)

    def stability_summary(self) -> dict[str, Any]:
        """The final ranking's stability: the overlap of the chosen sets and the rank correlation of the scores at
        the last two re-rankings, the smallest kept fraction of any structure, and the warnings they call for."""
        last = self.stability[-1] if self.stability else {}
        kept = [(1.0 - float(c.sum()) / c.numel(), s.name) for c, s in zip(self.chosen, self.structures)]
        smallest, where = min(kept)
        warn_below = max(self.floor, STARVED_SHARE) * (1.0 - self.config.p)
        warnings = []
        if self.floor < self.config.floor:
            warnings.append(
                f"the floor was lowered from {self.config.floor:g} to {self.floor:.3g} of the uniform share: with "
                f"{self.config.cost} costs the configured floors left less than p = {self.config.p:g} to remove"
            )
        if self.config.allocation == "unified" and smallest < warn_below - 1e-9:
            warnings.append(
                f"{where} keeps {smallest:.1%} of its elements, under {warn_below:.1%} ({STARVED_SHARE:g} of the "
                f"uniform share 1 - p): a noisy ranking may have starved it; consider --floor or a longer search"
            )
        overlap, correlation = last.get("overlap"), last.get("rank_correlation")
        if overlap is not None and (overlap < SETTLED or correlation < SETTLED):
            warnings.append(
                f"the ranking was still changing at the end of the search: between steps {self.stability[-2]['step']} "
                f"and {last['step']} {overlap:.1%} of the chosen elements stayed chosen and the scores' rank "
                f"correlation was {correlation:.2f} (settled: both >= {SETTLED:g}); a longer search (--epochs-search) "
                "or --score snr ranks more reliably"
            )
        return {
            "overlap": overlap,
            "rank_correlation": correlation,
            "min_kept_fraction": smallest,
            "min_kept_structure": where,
            "floor": self.floor,
            "rerankings": [dict(r) for r in self.stability],
            "warnings": warnings,
        }

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

    def log_record(self) -> dict[str, float]:
        return {
            "step": self.step_count,
            "pi": self.pi,
            "kept_attn": self.kept_fraction("attn"),
            "kept_mlp": self.kept_fraction("mlp"),
            "pruned_cost": self.pruned_cost_fraction(),
            "skipped_steps": self.skipped_steps,
        }

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
            "importance": [a.cpu().clone() for a in self.importance],
            "task_sum": self._task_sum.cpu().clone(),
            "task_sq": self._task_sq.cpu().clone(),
            "accumulated_steps": self.accumulated_steps,
            "stability": [dict(r) for r in self.stability],
            "last_scores": self._last_scores.clone() if self._last_scores is not None else None,
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
            for dst, src in zip(self.importance, state["importance"]):
                dst.copy_(src)
        self.chosen = [c.clone().bool() for c in state["chosen"]]
        if "task_sum" in state:
            with torch.no_grad():
                self._task_sum.copy_(state["task_sum"])
                self._task_sq.copy_(state["task_sq"])
            self.accumulated_steps = int(state["accumulated_steps"])
            self.stability = [dict(r) for r in state["stability"]]
            self._last_scores = state["last_scores"].clone() if state["last_scores"] is not None else None
        if "alignment" in state:  # the resumed search keeps the widths it measured, not a new measurement
            self.alignment.attn, self.alignment.mlp = (int(v) for v in state["alignment"])
            self.floor = self._fit_floor()

    def _costs(self, device: torch.device, example_inputs: Any) -> list[Cost]:
        """Per structure, the cost of an element (params, FLOPs) or the measured latency curve T(w) (rank 0's on every
        rank: one decision everywhere)."""
        if self.config.cost != "latency":
            return [float(s.element_cost(self.config.cost)) for s in self.structures]
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
        curves, self.latency_tables = latency_curves(
            self.structures, device, batch_size_of(example_inputs), precision, self.config.latency_table
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat(curves).to(device)
            dist.broadcast(flat, src=0)
            curves = list(torch.split(flat.cpu(), [s.size + 1 for s in self.structures]))
        return curves

    def latency_summary(self) -> dict[str, float] | None:
        """For cost="latency": the structures' measured time dense, kept, and the target (ms per example batch)."""
        if self.config.cost != "latency":
            return None
        dense = sum(float(c[s.size]) for c, s in zip(self.costs, self.structures))
        kept = sum(float(c[s.size - int(ch.sum())]) for c, s, ch in zip(self.costs, self.structures, self.chosen))
        prunable = sum(total_cost(c, s.size) for c, s in zip(self.costs, self.structures))
        return {"dense_ms": 1e3 * dense, "kept_ms": 1e3 * kept, "target_ms": 1e3 * (dense - self.config.p * prunable)}

    def _alignment(self, device: torch.device, example_inputs: Any, precisions: tuple[str, ...] | None) -> Alignment:
        """The alignment per kind: as configured, or for "auto" measured on ``device`` (rank 0's measurement on every
        rank)."""
        given = {k: getattr(self.config, f"align_{k}") for k in ("attn", "mlp")}
        if "auto" not in given.values():
            return Alignment(given["attn"], given["mlp"], "given")
        if precisions is None:
            half = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
            precisions = ("fp32", half) if device.type == "cuda" else ("fp32",)
        batch = batch_size_of(example_inputs) if example_inputs is not None else None
        # whole heads: the widths do not change, only the number of heads, which no tile size constrains
        probed = [s.dims_view() for s in self.structures if s.block == 1]
        measured = measure_alignment(probed, device, batch, tuple(precisions))
        for kind, value in given.items():
            if value != "auto":
                setattr(measured, kind, value)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            agreed = torch.tensor([measured.attn, measured.mlp], device=device)
            dist.broadcast(agreed, src=0)
            measured.attn, measured.mlp = int(agreed[0]), int(agreed[1])
        return measured

    def _count_tokens(self, example_inputs: Any) -> None:
        """Run one forward to learn how many tokens per sample each slot of each structure sees: every token that
        reaches it over the forward, divided by the batch (a model that encodes two images per sample counts both).
        A slot whose module is not called (a projection applied by its parent's functional code) sees the queries."""
        seen: dict[int, int] = {}
        handles = []
        slots = {id(slot.module): slot.module for s in self.structures for slot in (*s.rows, *s.cols)}
        for key, module in slots.items():

            def hook(module, inputs, out, key=key):
                x = inputs[0] if inputs else None
                if isinstance(x, torch.Tensor) and x.dim() >= 1:
                    seen[key] = seen.get(key, 0) + (x.numel() // x.shape[-1] if x.dim() > 1 else 1)

            handles.append(module.register_forward_hook(hook))
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                call_model(self.model, example_inputs)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        batch = max(1, batch_size_of(example_inputs))
        for s in self.structures:
            s.tokens = seen.get(id(s.rows[0].module), 0) // batch
            for slot in (*s.rows, *s.cols):
                slot.tokens = seen.get(id(slot.module), 0) // batch or s.tokens
