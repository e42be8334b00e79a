"""`make bench` (peers): how UPop compares with the baselines a reviewer asks for, at equal budgets, over seeds.

On one dense base per task (CPU): the built-in classification task with vit-tiny, retrieval with clip-tiny, and the
tasks of ``bench_blip.py`` and ``bench_seg.py`` with their run configurations, learning rate and epochs (blip-tiny on
NLVR, image-text retrieval, captioning and VQA; segmenter-tiny on segmentation; image-text retrieval on a quarter of
bench_blip's training scenes and ITM-rescoring 16 candidates, for time). Each table's header names its data's split
sizes. At 2x and 4x (p = 0.5 and 0.75 of the prunable parameters), every method prunes the same internal widths
(attention head dims, shared by all heads and by q, k, v, and MLP neurons; the embedding width is kept) and gets the
same total training:

- UPop, default ranking; UPop with the paper's ranking (``PAPER_RANKING``); UPop ``--allocation uniform``; whole heads
  and mixed granularity: search S epochs, then retrain R epochs.
- Torch-Pruning (a benchmark-only extra, ``pip install .[bench]``; never a runtime dependency), through its public
  API: ``MetaPruner`` with Taylor (``GroupTaylorImportance``, gradients of 10 training batches) or L2 magnitude
  (``GroupMagnitudeImportance``) importance, one shot, its per-layer ratio (and, in the "global" row, its one global
  ratio) bisected to UPop's parameter budget; then retrained S + R epochs. Its decision (which rows it kept) is read
  off the pruned weights and handed to ``upop.compress(plan=...)``, so retraining, selection and evaluation are
  the very code UPop's own rows run.

Equal budgets on the multi-tower models. Torch-Pruning gets the same structures as UPop's rows, in every tower (as
on CLIP: vision, text, and on BLIP the cross-attention and decoder towers too), so each of its rows removes p of
the whole model's prunable parameters, the budget every UPop row meets, and all rows of a p share one budget, one best
(in bold) and one verdict on the default row. Its graph handles every BLIP tower once HF's vision attention is
traced with q, k, v unpacked rather than indexed (``_splittable_qkv``: the same computation, on the copy it prunes);
checked on randomly initialised blip-tiny for NLVR, retrieval, captioning and VQA, Taylor and magnitude, per-layer and
global. Restricting it to one tower instead (``Bench.tp_towers``, e.g. BLIP's vision tower) would make p a share of
that tower's parameters, another budget: those rows are then shown as a budget of their own ("2x of the vision
tower"), beside UPop at that same budget ("upop-vision", "uniform-vision", which run only where Torch-Pruning is so
restricted), with its own verdict; no task needs it now. Where Torch-Pruning cannot run at all (``Bench.tp_not_run``
says why; no task now), the table says so in a row instead.

Every score is on the report split, the retraining epoch chosen on the selection split. Seeds change the search and
retraining data order (and Torch-Pruning's Taylor batches); the base is shared. Each run's wall time is kept in its
directory (``bench_seconds.json``) and each table's header says how long its part took. In bold: each budget's best
mean (mean ± std and last epoch separately); under each table, one sentence per budget on the default row
(``verdict``). Where reports record their selection rule's standard error, a "selection SE" column shows its median
over seeds. Writes
benchmarks/results/peers.md and .json; a run of some tasks or methods (``--tasks``, ``--methods``) replaces those rows
in the JSON and keeps the others where they were made on the same dense base, epochs and machine and with what their
method makes today (the JSON records it per row, ``made_with``), and the markdown is always rendered from the whole JSON
(``--tables-only`` renders it without running).
Runs already present under runs/bench-peers/<task> are reused.

    python benchmarks/bench_peers.py --tasks classification,retrieval      # one part or several
    python benchmarks/bench_peers.py --tasks segmentation --seeds 0,1,2 --ps 0.5,0.75
    python benchmarks/bench_peers.py --study                               # the ranking study
    python benchmarks/bench_peers.py --tables-only                         # peers.md from peers.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

import upop
from upop.adapters import find_adapter
from upop.core.config import PAPER_RANKING
from upop.core.plan import Plan
from upop.core.structure import Structure
from upop.data.config import DataConfig
from upop.jobs.common import RunConfig, device_name, prepare
from upop.jobs.compress import Recipe, compress
from upop.jobs.report import CompressReport, TrainReport
from upop.jobs.train import train
from upop.tasks.base import TaskOptions

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_blip import BENCHES as BLIP  # noqa: E402  (the BLIP tasks' run configurations and LR)
from bench_blip import LR as BLIP_LR  # noqa: E402
from bench_seg import CFG as SEG_CFG  # noqa: E402
from bench_seg import LR as SEG_LR  # noqa: E402
from common import cpu_model  # noqa: E402

ROOT = HERE.parent
RESULTS = HERE / "results"  # the tables and raw values the docs include
TAYLOR_BATCHES = 10
TIE = 0.1  # the least margin a verdict calls a win or a loss
SECONDS = "bench_seconds.json"  # a run's wall time, in its directory


@dataclasses.dataclass(frozen=True)
class Bench:
    """One task of the comparison: its run configuration, the dense base's training (epochs, LR), UPop's search and
    retraining epochs (Torch-Pruning retrains their sum), the table's metric, the compress LR (search and retraining;
    None: ``Recipe``'s defaults), the towers Torch-Pruning prunes (empty: every structure) and, where it cannot run
    on the task, why."""

    cfg: RunConfig
    base_epochs: int
    base_lr: float
    search: int
    retrain: int
    metric: str
    lr: float | None = None
    tp_towers: tuple[str, ...] = ()
    tp_not_run: str = ""

    def recipe(self, search: int, retrain: int) -> Recipe:
        lrs = {} if self.lr is None else {"lr_search": self.lr, "lr": self.lr}
        return Recipe(epochs_search=search, epochs=retrain, **lrs)

    def about(self) -> dict[str, Any]:
        """What the table's header says of the task (kept in the JSON, so the table is a function of it)."""
        keys = ("base_epochs", "base_lr", "search", "retrain", "metric", "lr", "tp_towers")
        data = {"train_size": self.cfg.data.train_size, "val_size": self.cfg.data.val_size}
        defaults = dataclasses.asdict(TaskOptions())
        options = {k: v for k, v in dataclasses.asdict(self.cfg.options).items() if v != defaults[k]}
        return {"model": self.cfg.model, **data, "options": options, **{k: getattr(self, k) for k in keys}}


def _blip(task: str, metric: str) -> Bench:
    """A task of bench_blip.py, as it runs there: 12 base epochs, search 2 + retrain 4, its LR everywhere. Torch-
    Pruning prunes every tower, as UPop does (``tp_towers=("vision",)`` would compare at the vision tower's budget,
    beside the "upop-vision" row)."""
    return Bench(BLIP[task].cfg, 12, BLIP_LR, 2, 4, metric, lr=BLIP_LR)


TASKS = {
    "classification": Bench(RunConfig(model="vit-tiny"), 15, 2e-3, 2, 3, "top1"),
    "retrieval": Bench(
        RunConfig(task="retrieval", model="clip-tiny", data=DataConfig(train_size=4000, val_size=500)),
        15,
        1e-3,
        3,
        6,
        "r_mean",
    ),
    "nlvr": _blip("nlvr", "accuracy"),
    # bench_blip.py's retrieval at a quarter of its training scenes (1000, 5 captions each) and rescoring each query's
    # top 16 by ITM instead of 128: on this CPU its 4000 scenes cost 45 s an epoch, and each evaluation as much (384k
    # ITM pairs): a run of 6 epochs took 7 min, the table 3 hours
    "blip-retrieval": dataclasses.replace(
        _blip("retrieval", "r_mean"),
        cfg=dataclasses.replace(
            BLIP["retrieval"].cfg,
            data=DataConfig(train_size=1000, val_size=500),
            options=TaskOptions(rerank_k=16),
        ),
    ),
    "caption": _blip("caption", "cider"),
    "vqa": _blip("vqa", "accuracy"),
    "segmentation": Bench(SEG_CFG, 12, SEG_LR, 2, 4, "miou", lr=SEG_LR),  # bench_seg.py's
}
METHODS = {  # name -> (row label, kind, settings)
    "upop": ("UPop (default: --score fisher --floor 0.75 --allocation tower)", "upop", {}),
    "floor0.5": ("UPop --floor 0.5 (the default until 2026-12-04)", "upop", {"floor": 0.5}),
    "unified": (
        "UPop --allocation unified --floor 0.5 (one budget over every tower)",
        "upop",
        {"allocation": "unified", "floor": 0.5},
    ),
    "upop-paper": ("UPop, paper's ranking", "upop", dict(PAPER_RANKING)),
    "uniform": ("UPop --allocation uniform", "upop", {"allocation": "uniform"}),
    "heads": ("UPop --granularity head (whole heads)", "upop", {"granularity": "head"}),
    "mixed": ("UPop --granularity mixed (heads, then dims)", "upop", {"granularity": "mixed"}),
    "tp-taylor": ("Torch-Pruning Taylor", "tp", {"importance": "taylor", "global": False}),
    "tp-magnitude": ("Torch-Pruning L2 magnitude", "tp", {"importance": "magnitude", "global": False}),
    "tp-taylor-global": ("Torch-Pruning Taylor, global ratio", "tp", {"importance": "taylor", "global": True}),
    # UPop at Torch-Pruning's budget on a task where it prunes only the vision tower (``Bench.tp_towers``; none now)
    "upop-vision": ("UPop --towers vision (default ranking)", "upop", {"towers": ("vision",)}),
    "uniform-vision": (
        "UPop --towers vision --allocation uniform",
        "upop",
        {"towers": ("vision",), "allocation": "uniform"},
    ),
    # tried for the default at 2x (issue 24): the same total epochs, one moved from the search to retraining
    "search-1": ("UPop, one search epoch moved to retraining", "upop", {"search_shift": -1}),
    # tried for the default at 2x (issue 24): a higher floor with the paper's one budget over every tower
    "unified-floor0.75": (
        "UPop --allocation unified --floor 0.75",
        "upop",
        {"allocation": "unified", "floor": 0.75},
    ),
    # tried for the default (issue 24): each structure's scores standardised on their own, so a layer's gradient
    # scale (which sent 9 of the Segmenter's 12 structures to the floor at 4x) no longer decides its share; with the
    # default's budget per tower, and with one budget over every tower
    "structure": ("UPop --standardise structure", "upop", {"standardise": "structure"}),
    "unified-structure": (
        "UPop --standardise structure --allocation unified",
        "upop",
        {"standardise": "structure", "allocation": "unified"},
    ),
    # tried for the default (issue 24): one budget over every tower, each tower's scores standardised on their own
    # (a tower's gradient scale no longer moves the budget; the layers' scales within a tower still do)
    "unified-tower": (
        "UPop --allocation unified --standardise tower",
        "upop",
        {"allocation": "unified", "standardise": "tower"},
    ),
    # the ranking study (what was tried to make the unified ranking earn its keep), one change from the paper's each
    "study-snr": ("paper's ranking, --score snr", "upop", {**PAPER_RANKING, "score": "snr"}),
    "study-snr-floor0.5": ("--score snr --floor 0.5", "upop", {**PAPER_RANKING, "score": "snr", "floor": 0.5}),
    "study-fisher": ("paper's ranking, --score fisher", "upop", {**PAPER_RANKING, "score": "fisher"}),
    "uniform-paper": ("--allocation uniform --paper-ranking", "upop", {**PAPER_RANKING, "allocation": "uniform"}),
    "study-fisher-tower": (
        "--score fisher --floor 0.5 --standardise tower",
        "upop",
        {"score": "fisher", "floor": 0.5, "standardise": "tower", "allocation": "unified"},
    ),
    "study-structure": (
        "paper's ranking, --standardise structure",
        "upop",
        {**PAPER_RANKING, "standardise": "structure"},
    ),
    "study-floor0.5": ("paper's ranking, --floor 0.5", "upop", {**PAPER_RANKING, "floor": 0.5}),
}
MAIN = [
    "upop",
    "floor0.5",
    "unified",
    "upop-paper",
    "uniform",
    "heads",
    "mixed",
    "tp-taylor",
    "tp-magnitude",
    "tp-taylor-global",
]
STUDY = {  # task -> (budgets, methods) of the ranking study
    "classification": (
        "0.75",
        [
            "upop",
            "upop-paper",
            "study-fisher",
            "study-snr",
            "study-snr-floor0.5",
            "study-floor0.5",
            "study-structure",
            "uniform",
            "uniform-paper",
        ],
    ),
    "retrieval": ("0.5,0.75", ["upop", "upop-paper", "study-fisher-tower"]),
}


# ------------------------------------------------------------------------------------------------ Torch-Pruning
def _kept_rows(original: torch.Tensor, pruned: torch.Tensor, groups: int, block: int) -> list[torch.Tensor]:
    """Per output group, the element indices whose rows survive in ``pruned`` (rows laid out (groups, n, block))."""
    o = original.detach().reshape(groups, -1, block * original.shape[-1]).double()
    p = pruned.detach().reshape(groups, -1, block * pruned.shape[-1]).double()
    probe = torch.randn(o.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kept = []
    for g in range(groups):
        index = ((p[g] @ probe)[:, None] - (o[g] @ probe)[None, :]).abs().argmin(1)
        if not torch.equal(o[g][index], p[g]):
            raise RuntimeError("Torch-Pruning changed rows it kept; cannot read its decision off the weights")
        kept.append(index.sort().values)
    return kept


def _structures(model: torch.nn.Module, towers: tuple[str, ...]) -> list[Structure]:
    """UPop's head-dim structures of ``model`` in ``towers`` (all without), in the order a Pruner holds them."""
    found = find_adapter(model).structures(model, "dim")
    return [s for s in found if not towers or s.tower in towers]


def _qkv_unpacked(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
    """HF ``BlipAttention.forward``'s computation, with q, k and v unpacked (an unbind) instead of indexed."""
    b, n, width = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv
    probs = self.dropout(torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1))
    return self.projection((probs @ v).permute(0, 2, 1, 3).reshape(b, n, width)), probs


def _splittable_qkv(model: torch.nn.Module) -> None:
    """On the copy Torch-Pruning prunes, give HF BLIP's vision attentions a forward its graph can follow. HF's picks
    q, k, v out of the fused projection by indexing (``mixed_qkv[0]``), which Torch-Pruning 1.6.1 does not take for
    a split: it couples the 3 x width rows of ``qkv`` with the width inputs of ``projection`` and fails (IndexError
    in the importance). The same computation with q, k, v unpacked (an unbind, as timm's and the Segmenter's
    attention do) it splits per q, k, v and head. Outputs are unchanged; the model UPop retrains is not touched."""
    if not any(type(m).__name__ == "BlipAttention" for m in model.modules()):
        return
    from transformers.models.blip.modeling_blip import BlipAttention

    for module in model.modules():
        if type(module) is BlipAttention:
            module.forward = types.MethodType(_qkv_unpacked, module)


def tp_choice(
    model: torch.nn.Module,
    example: Any,
    ratio: float,
    importance: Any,
    global_pruning: bool,
    grads: Any,
    towers: tuple[str, ...] = (),
) -> list[torch.Tensor]:
    """Run Torch-Pruning on a copy of ``model`` and return its decision as UPop choices (per structure, True =
    pruned). Only the rows of UPop's structures (q/k/v or fused qkv, the first MLP linear) of ``towers`` (every
    tower without) are roots, every other linear or convolution is ignored, so it prunes head dims (the same in every
    head, ``prune_head_dims``) and MLP neurons of those towers; the embedding width is kept."""
    import torch_pruning as tp

    work = copy.deepcopy(model)
    _splittable_qkv(work)
    structures = _structures(work, towers)
    rows = [(r.module, r.groups, r.block, r.module.weight.detach().clone()) for s in structures for r in s.rows]
    roots = {r[0] for r in rows}
    ignored = [m for m in work.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m not in roots]
    heads = {
        r.module: r.groups // (3 if r.groups % 3 == 0 and "qkv" in r.path else 1)
        for s in structures
        if s.kind == "attn"
        for r in s.rows
    }
    pruner = tp.pruner.MetaPruner(
        work,
        example,
        importance=importance,
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=ignored,
        num_heads=heads,
        prune_head_dims=True,
        prune_num_heads=False,
    )
    if grads is not None:  # Taylor: the gradients of a few training batches, on the model being pruned
        work.zero_grad()
        grads(work)
    pruner.step()
    return _read_choice(structures, rows)


def _read_choice(structures: list[Structure], rows: list[tuple]) -> list[torch.Tensor]:
    """Torch-Pruning's decision read off the pruned row weights: per structure, True = pruned."""
    chosen, at = [], 0
    for s in structures:
        sets = []
        for _ in s.rows:
            module, groups, block, original = rows[at]
            at += 1
            sets.extend(_kept_rows(original, module.weight, groups, block))
        if any(not torch.equal(sets[0], k) for k in sets[1:]):
            raise RuntimeError(f"Torch-Pruning kept different dims in the heads or q/k/v of {s.name}")
        c = torch.ones(s.size, dtype=torch.bool)
        c[sets[0]] = False
        chosen.append(c)
    return chosen


def as_upop_plan(
    model: torch.nn.Module, chosen: list[torch.Tensor], towers: tuple[str, ...] = ()
) -> tuple[float, Plan]:
    """A choice as UPop sees it: the fraction of the prunable parameters (of ``towers``) it removes (UPop's params
    cost, the budget every row meets) and its plan."""
    config = upop.PruneConfig(p=0.5, align_attn=1, align_mlp=1, towers=towers)
    pruner = upop.Pruner(copy.deepcopy(model), config)
    pruner.set_choice(chosen, 0.0)
    return pruner.pruned_cost_fraction(), pruner.plan()


def _importance(setup: Any, settings: dict) -> tuple[Any, Any]:
    """Torch-Pruning's importance for ``settings``, and for Taylor the callable that accumulates the gradients of
    the first ``TAYLOR_BATCHES`` training batches on a model (None for magnitude)."""
    import torch_pruning as tp

    if settings["importance"] != "taylor":
        return tp.importance.GroupMagnitudeImportance(p=2), None
    batches = []
    for batch in setup.loaders.train:
        batches.append(batch)
        if len(batches) == TAYLOR_BATCHES:
            break

    def grads(m: torch.nn.Module) -> None:
        for batch in batches:
            setup.task.loss(m, batch).backward()

    return tp.importance.GroupTaylorImportance(), grads


def tp_plan(
    cfg: RunConfig, pretrained: str | None, p: float, settings: dict, towers: tuple[str, ...] = ()
) -> tuple[Plan, dict]:
    """Torch-Pruning's plan at UPop's budget p (of ``towers``' prunable params): its ratio bisected until the removed
    share is closest to p."""
    torch.manual_seed(cfg.seed)
    setup = prepare(cfg, pretrained)
    model = setup.model
    example = setup.task.example_inputs(next(iter(setup.loaders.report)), model)
    importance, grads = _importance(setup, settings)
    low, high, best = 0.0, 0.99, None
    for _ in range(12):
        ratio = (low + high) / 2
        chosen = tp_choice(model, example, ratio, importance, settings["global"], grads, towers)
        removed, plan = as_upop_plan(model, chosen, towers)
        if best is None or abs(removed - p) < abs(best[1] - p):
            best = (ratio, removed, plan)
        low, high = (ratio, high) if removed < p else (low, ratio)
    ratio, removed, plan = best
    return plan, {"ratio": ratio, "removed": removed, "towers": list(towers)}


# ------------------------------------------------------------------------------------------------------ runs
def _write_seconds(directory: Path, seconds: float) -> None:
    (directory / SECONDS).write_text(json.dumps({"seconds": seconds}) + "\n")


def _read_seconds(directory: Path) -> float | None:
    """The wall seconds a run took (None for a run made before they were recorded)."""
    path = directory / SECONDS
    return float(json.loads(path.read_text())["seconds"]) if path.is_file() else None


def scope(task: str, method: str) -> tuple[str, ...]:
    """The towers a row of ``task`` prunes (empty: the whole model): its budget is p of their prunable params."""
    _, kind, settings = METHODS[method]
    return tuple(TASKS[task].tp_towers if kind == "tp" else settings.get("towers", ()))


def split_methods(task: str, methods: list[str]) -> tuple[list[str], dict[str, str]]:
    """The methods that run on ``task``, and the Torch-Pruning rows that cannot, with why. A UPop row restricted to
    some towers runs only where Torch-Pruning is restricted to the same towers and runs (it is there to meet it)."""
    bench, run, not_run = TASKS[task], [], {}
    for method in methods:
        kind, towers = METHODS[method][1], scope(task, method)
        if kind == "tp" and bench.tp_not_run:
            not_run[method] = bench.tp_not_run
        elif kind == "upop" and towers and (towers != bench.tp_towers or bench.tp_not_run):
            print(f"{task}: {method} skipped (Torch-Pruning does not prune {', '.join(towers)} alone here)")
        else:
            run.append(method)
    return run, not_run


def base(task: str, runs: Path) -> tuple[str, float | None]:
    """The task's dense base (trained once, reused) and the seconds its training took."""
    bench, out = TASKS[task], runs / "base"
    if not (out / "report.json").is_file():
        start = time.time()
        train(bench.cfg, epochs=bench.base_epochs, lr=bench.base_lr, output_dir=str(out), overwrite=True)
        _write_seconds(out, time.time() - start)
    return str(out / "model.safetensors"), _read_seconds(out)


def _run_dir(task: str, method: str, p: float, seed: int, runs: Path) -> Path:
    restricted = "".join(f"-{t}" for t in TASKS[task].tp_towers) if METHODS[method][1] == "tp" else ""
    return runs / f"{method}{restricted}-p{p}-seed{seed}"  # a tower-restricted Torch-Pruning row: another budget


RANKED_BY = ("p", "score", "standardise", "floor", "allocation", "granularity", "towers")  # what makes a UPop row


def _ranking_keys(kind: str, allocation: str) -> tuple[str, ...]:
    """The settings that decide a row's choice: a UPop row's ranking, a Torch-Pruning row's budget alone (its plan
    decides); uniform allocation keeps 1 - p of every structure, ordered by score alone, so no floor binds."""
    if kind != "upop":
        return ("p",)
    return tuple(k for k in RANKED_BY if allocation != "uniform" or k not in ("floor", "standardise"))


def stale(out: Path, kind: str, p: float, settings: dict) -> list[str]:
    """The settings a kept UPop run was made with that its row no longer asks for (a default changed since, say):
    such a run is made again rather than reused under a label it does not match. Torch-Pruning rows choose by their
    plan, so only their budget counts."""
    path = out / "report.json"
    if not path.is_file():
        return []
    have = json.loads(path.read_text()).get("prune", {})
    want = json.loads(json.dumps(dataclasses.asdict(upop.PruneConfig(p=p, **_ranking(settings)))))
    keys = _ranking_keys(kind, want["allocation"])
    return [f"{k} {have.get(k)!r} -> {want[k]!r}" for k in keys if have.get(k) != want[k]]


def made_with(task: str, method: str) -> dict:
    """What a row's runs are made with, as the JSON records it beside the row: a UPop row's ranking settings with
    today's defaults filled in (so a changed default shows), a Torch-Pruning row's importance, ratio and towers."""
    _, kind, settings = METHODS[method]
    if kind == "tp":
        return {"kind": kind, **settings, "towers": list(scope(task, method))}
    resolved = json.loads(json.dumps(dataclasses.asdict(upop.PruneConfig(p=0.5, **_ranking(settings)))))
    shift = {"search_shift": settings["search_shift"]} if "search_shift" in settings else {}
    return {"kind": kind, **{k: resolved[k] for k in _ranking_keys(kind, resolved["allocation"]) if k != "p"}, **shift}


def _ranking(settings: dict) -> dict:
    """A UPop row's PruneConfig settings: all but ``search_shift`` (epochs moved from the search to retraining)."""
    return {k: v for k, v in settings.items() if k != "search_shift"}


def _cached(task: str, method: str, p: float, seed: int, runs: Path) -> bool:
    """Whether a run of this row is kept and still matches its settings."""
    out, (_, kind, settings) = _run_dir(task, method, p, seed, runs), METHODS[method]
    return (out / "report.json").is_file() and not stale(out, kind, p, settings if kind == "upop" else {})


def one_run(task: str, method: str, p: float, seed: int, runs: Path, pretrained: str) -> dict:
    bench = TASKS[task]
    cfg = dataclasses.replace(bench.cfg, seed=seed)
    _, kind, settings = METHODS[method]
    out = _run_dir(task, method, p, seed, runs)
    changed = stale(out, kind, p, settings if kind == "upop" else {})
    if changed:
        print(f"{task} {method} p={p} seed {seed}: made again ({'; '.join(changed)})", flush=True)
    if changed or not (out / "report.json").is_file():
        start = time.time()
        if kind == "upop":
            shift = settings.get("search_shift", 0)
            recipe = bench.recipe(bench.search + shift, bench.retrain - shift)
            compress(cfg, upop.PruneConfig(p=p, **_ranking(settings)), pretrained, recipe, str(out), overwrite=True)
        else:
            plan, extra = tp_plan(cfg, pretrained, p, settings, bench.tp_towers)
            recipe = bench.recipe(0, bench.search + bench.retrain)
            prune = upop.PruneConfig(p=p, towers=bench.tp_towers)
            compress(cfg, prune, pretrained, recipe, str(out), overwrite=True, plan=plan)
            (out / "torch_pruning.json").write_text(json.dumps(extra) + "\n")
        _write_seconds(out, time.time() - start)
        print(f"{task} {method} p={p} seed {seed}: {_read_seconds(out):.0f} s", flush=True)
    return run_row(CompressReport.read(out), bench.metric, seed, _read_seconds(out))


def run_row(r: CompressReport, metric: str, seed: int, seconds: float | None) -> dict:
    """What the table keeps of a run's report (``selection_se``: the selection rule's standard error, where the
    report records one)."""
    stability = r.stability or {}
    selection = getattr(r, "selection", None)
    se = selection.get("standard_error") if isinstance(selection, dict) else None
    return {
        "seed": seed,
        "score": r.compressed.metrics[metric],
        "last": r.compressed_last.metrics[metric],
        "before_retraining": r.searched_metrics[metric],
        "removed": r.pruned_cost_fraction,
        "speedup": r.speed.speedup,
        "min_kept": min(s["kept"] / s["size"] for s in r.per_structure),
        "overlap": stability.get("overlap"),
        "seconds": seconds,
        "selection_se": se,
    }


def run_task(task: str, ps: list[float], methods: list[str], seeds: list[int], cached_only: bool = False) -> dict:
    """Every run of one task (its part of the table), as the JSON keeps it; with ``cached_only``, only the rows
    whose runs all exist (nothing is trained)."""
    runs = ROOT / "runs" / "bench-peers" / task
    bench = TASKS[task]
    pretrained, base_seconds = base(task, runs)
    run, not_run = split_methods(task, methods)
    results = {
        str(p): {
            m: [one_run(task, m, p, s, runs, pretrained) for s in seeds]
            for m in run
            if not cached_only or all(_cached(task, m, p, s, runs) for s in seeds)
        }
        for p in ps
    }
    return {
        "about": bench.about(),
        "dense": TrainReport.read(runs / "base").metrics[bench.metric],
        "base_seconds": base_seconds,
        "machine": f"{device_name(None)}, {torch.get_num_threads()} threads",
        "processor": cpu_model(),  # said in the header; not compared by a merge (the dense score is)
        "scopes": {m: list(scope(task, m)) for m in run},
        "made_with": {m: made_with(task, m) for m in run},
        "not_run": not_run,
        "results": results,
    }


# ------------------------------------------------------------------------------------------------------ tables
def _se(values: list[float]) -> float:
    """The standard error of the mean of ``values`` over seeds (0 for one seed)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def compare(rows: dict[str, list[float]], default: str = "upop") -> tuple[str, float, float, str] | None:
    """The ``default`` row against the best other one by mean: (that row, the difference of the means, the margin,
    "wins" / "ties" / "loses"); a difference within max(0.1, the standard error over seeds of the difference of the
    two means, from each one's std / sqrt(n)) ties. None when there is no other row.
    ``rows``: per row, its scores over seeds (higher is better)."""
    mean = {k: statistics.mean(v) for k, v in rows.items()}
    others = {k: v for k, v in mean.items() if k != default}
    if not others:
        return None
    rival = max(others, key=others.__getitem__)
    gap = mean[default] - mean[rival]
    margin = max(TIE, math.hypot(_se(rows[default]), _se(rows[rival])))
    outcome = "ties" if abs(gap) <= margin + 1e-9 else "wins" if gap > 0 else "loses"  # exactly the margin ties
    return rival, gap, margin, outcome


def verdict(rows: dict[str, list[float]], default: str = "upop") -> str:
    """One sentence: whether the ``default`` row's mean wins against the best other row, ties with it or loses, and
    by how much (``compare``)."""
    found = compare(rows, default)
    if found is None:
        return f"`{default}` ran alone: nothing to compare it with."
    rival, gap, margin, outcome = found
    mean = {k: statistics.mean(v) for k, v in rows.items()}
    us, them = f"`{default}` ({mean[default]:.2f})", f"`{rival}` ({mean[rival]:.2f})"
    if outcome == "ties":
        return f"{us} ties with the best other row, {them}: a difference of {gap:+.2f}, within the margin {margin:.2f}."
    if outcome == "wins":
        return f"{us} wins: {gap:.2f} above the best other row, {them}, beyond the margin {margin:.2f}."
    return f"{us} loses to {them} by {-gap:.2f}, beyond the margin {margin:.2f}."


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _label(p: float, towers: tuple[str, ...]) -> str:
    where = f" of the {' + '.join(towers)} tower" if towers else ""
    return f"{1 / (1 - p):.0f}x{where} (p = {p})"


def _budgets(entry: dict, p: str) -> list[tuple[str, str, dict[str, list[dict]]]]:
    """The budgets of p in the table: the whole model and each tower restriction its rows have (the rows of a
    restriction remove p of those towers' prunable params); each as (label, its default row, {method: runs})."""
    scopes = entry.get("scopes", {})
    by_scope: dict[tuple[str, ...], dict[str, list[dict]]] = {}
    for method, runs in entry["results"][p].items():
        by_scope.setdefault(tuple(scopes.get(method, ())), {})[method] = runs
    return [(_label(float(p), t), "-".join(["upop", *t]), by_scope[t]) for t in sorted(by_scope, key=len)]


def _bold_best(cells: list[str], means: list[float]) -> list[str]:
    """``cells`` with those of the best mean (to the shown precision) in bold."""
    best = round(max(means), 2)
    return [f"**{c}**" if round(m, 2) == best else c for c, m in zip(cells, means)]


def _timing(entry: dict) -> str:
    """How long the task's part took: the base's training and every run shown, as recorded, and where."""
    runs = [r for rows in entry["results"].values() for rs in rows.values() for r in rs]
    seconds = [entry.get("base_seconds"), *(r.get("seconds") for r in runs)]
    known = [t for t in seconds if t is not None]
    where = [entry["machine"]] if "machine" in entry else []
    where += [f"the last part ran on {entry['processor']}"] if "processor" in entry else []
    machine = f" ({'; '.join(where)})" if where else ""
    if not known:
        return f"its time was not recorded{machine}"
    missing = len(seconds) - len(known)
    took = f"{sum(known) / 60:.0f} min"
    if missing:
        took = f"at least {took} ({missing} of its {len(seconds)} jobs not timed)"
    return f"this part took {took} on this machine{machine}"


HEAD = [
    "budget",
    "method",
    "mean ± std",
    "per seed",
    "last epoch",
    "before retraining",
    "params removed",
    "smallest kept share",
    "speedup",
]
FOOTER = (
    "Speedup: the compressed model against the dense one on the machine of its header, median of 30 back-to-back "
    "pairs at the evaluation batch, median over seeds. In bold: the best mean of each budget, in the mean ± std and "
    "in the last epoch columns separately. Each budget's sentence sets its default row against the best other row; "
    "a difference within max(0.1, the standard error over seeds of the difference of the two means) is a tie."
)


def _data(about: dict) -> str:
    """The built-in data's split sizes and the task's options off their defaults, where the JSON records them."""
    if "train_size" not in about:
        return ""
    options = "".join(f", {k.replace('_', '-')} {v}" for k, v in about.get("options", {}).items())
    return f", built-in data: {about['train_size']} training / {about['val_size']} report scenes{options}"


def _header(task: str, entry: dict) -> str:
    about = entry.get("about") or TASKS[task].about()
    runs = [r for rows in entry["results"].values() for rs in rows.values() for r in rs]
    seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in runs}))
    lr = f" at LR {about['lr']:g}" if about.get("lr") else ""
    s, r = about["search"], about["retrain"]
    return (
        f"**{task}** ({about['model']}{_data(about)}; {about['metric']} on the report split, dense "
        f"{entry['dense']:.2f}; UPop "
        f"searches {s} + retrains {r} epochs{lr}, Torch-Pruning retrains {s + r}; seeds {seeds}; {_timing(entry)})"
    )


def _budget_rows(label: str, rows: dict[str, list[dict]], with_se: bool) -> list[str]:
    """The table rows of one budget, its best means in bold."""
    methods = list(rows)
    scores = _bold_best(
        [_ms([r["score"] for r in rows[m]]) for m in methods], [_mean(rows[m], "score") for m in methods]
    )
    lasts = _bold_best([_ms([r["last"] for r in rows[m]]) for m in methods], [_mean(rows[m], "last") for m in methods])
    lines = []
    for method, score, last in zip(methods, scores, lasts):
        rs = rows[method]
        cells = [
            label,
            f"{METHODS[method][0] if method in METHODS else method} (`{method}`)",
            score,
            " / ".join(f"{r['score']:.2f}" for r in rs),
            last,
            _ms([r["before_retraining"] for r in rs]),
            f"{statistics.mean(r['removed'] for r in rs):.3f}",
            f"{min(r['min_kept'] for r in rs):.3f}",
            f"{statistics.median(r['speedup'] for r in rs):.2f}x",
        ]
        if with_se:
            se = [r["selection_se"] for r in rs if r.get("selection_se") is not None]
            cells.append(f"{statistics.median(se):.2f}" if se else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mean(runs: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in runs)


def table(task: str, entry: dict) -> list[str]:
    """One task's table (from its JSON entry), then one sentence per budget on the default row."""
    runs = [r for rows in entry["results"].values() for rs in rows.values() for r in rs]
    with_se = any(r.get("selection_se") is not None for r in runs)
    head = HEAD + ["selection SE"] * with_se
    lines = [_header(task, entry), "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    sentences = []
    for p in entry["results"]:
        for label, default, rows in _budgets(entry, p):
            lines += _budget_rows(label, rows, with_se)
            if default in rows and len(rows) > 1:
                scores = {m: [r["score"] for r in rs] for m, rs in rows.items()}
                sentences.append(f"{label}: {verdict(scores, default)}")
        for reason in sorted(set(entry.get("not_run", {}).values())):
            cells = [_label(float(p), ()), f"Torch-Pruning: not run — {reason}"] + ["-"] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", *sentences]


def render(everything: dict) -> str:
    """The markdown of the results JSON (every task in it, in ``TASKS``' order)."""
    lines = []
    for task in [t for t in TASKS if t in everything] + sorted(set(everything) - set(TASKS)):
        lines += table(task, everything[task]) + [""]
    return "\n".join([*lines, FOOTER]) + "\n"


PEERS = ("uniform", "upop-paper")  # with every Torch-Pruning row: the rows the default must match or beat


def _is_peer(method: str) -> bool:
    return method in PEERS or (method in METHODS and METHODS[method][1] == "tp")


def _target_cell(rows: dict[str, list[dict]]) -> str:
    """The default row of one budget against the best of its peers (uniform, the paper's ranking, Torch-Pruning),
    and which peers did not run."""
    peers = {m: [r["score"] for r in rs] for m, rs in rows.items() if _is_peer(m)}
    missing = [
        name
        for name, there in (
            ("paper's ranking", "upop-paper" in peers),
            ("Torch-Pruning", any(not m.startswith("upop") and m != "uniform" for m in peers)),
        )
        if not there
    ]
    found = compare({"upop": [r["score"] for r in rows["upop"]], **peers}) if "upop" in rows and peers else None
    if found is None:
        return "not run"
    rival, gap, margin, outcome = found
    mean = statistics.mean(r["score"] for r in rows["upop"])
    cell = f"**{outcome}**: {mean:.2f} against `{rival}` {mean - gap:.2f} ({gap:+.2f}, margin {margin:.2f})"
    return cell + (f"; no {' or '.join(missing)} row" if missing else "")


def summary(everything: dict, complete: bool = True) -> str:
    """One line per task: its dense score, and at each budget of the whole model the default against the best of
    its peers (the verdicts under each table compare it with every row, its own variants included). ``complete``:
    the file should hold every task (the main table), so the ones it lacks are named."""
    budgets = sorted({p for entry in everything.values() for p in entry["results"]}, key=float)
    head = ["task", "model", "dense"] + [_label(float(p), ()) for p in budgets]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for task in [t for t in TASKS if t in everything]:
        entry, cells = everything[task], []
        for p in budgets:
            whole = [rows for _, _, rows in _budgets(entry, p)[:1]] if p in entry["results"] else []
            cells.append(_target_cell(whole[0]) if whole and whole[0] else "not run")
        model = (entry.get("about") or TASKS[task].about())["model"]
        dense = f"{entry['dense']:.2f}" if entry.get("dense") is not None else "-"
        lines.append("| " + " | ".join([task, f"`{model}`", dense, *cells]) + " |")
    missing = [t for t in TASKS if t not in everything] if complete else []
    tail = f"\nNot in the comparison yet: {', '.join(missing)}.\n" if missing else ""
    return "\n".join(lines) + "\n" + tail


def merge_task(task: str, old: dict | None, new: dict) -> dict:
    """A task's part after a run of some of its rows: ``new``'s rows replace the same rows (budget, method) of
    ``old``, whose other rows stay when they were made on the same base (the same dense score), epochs and machine,
    and with what their method makes today (their ``made_with`` record); a row that does not match is dropped, and
    said so."""
    differ = [k for k in ("dense", "about", "machine") if old and old.get(k) != new.get(k)]
    if not old or differ:
        if old:
            print(f"{task}: the kept rows are dropped (another {', '.join(differ)})")
        return new
    made, results = old.get("made_with", {}), {}
    for p, rows in old["results"].items():
        for method, runs in rows.items():
            if method in METHODS and made.get(method) == made_with(task, method):
                results.setdefault(p, {})[method] = runs
            else:
                print(f"{task} p={p}: the kept {method} row is dropped (its method makes other runs now)")
    for p, rows in new["results"].items():
        results.setdefault(p, {}).update(rows)
    order = list(METHODS)  # rows in the order of METHODS, budgets by p, as a run of them all writes them
    results = {p: dict(sorted(results[p].items(), key=lambda r: order.index(r[0]))) for p in sorted(results, key=float)}
    kept = [m for m in METHODS if any(m in rows for rows in results.values())]
    not_run = {m: why for m, why in {**old.get("not_run", {}), **new["not_run"]}.items() if m not in kept}
    return {
        **old,
        **new,
        "results": results,
        "scopes": {m: list(scope(task, m)) for m in kept},
        "made_with": {m: made_with(task, m) for m in kept},
        "not_run": not_run,
    }


def write_results(name: str, entries: dict) -> str:
    """Merge ``entries`` (task -> its part) into benchmarks/results/<name>.json (``merge_task``: a run of some
    rows keeps the task's other rows) and render <name>.md from the merged JSON; returns the markdown."""
    path = RESULTS / f"{name}.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    for task, entry in json.loads(json.dumps(entries)).items():
        merged[task] = merge_task(task, merged.get(task), entry)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    text = render(merged)
    (RESULTS / f"{name}.md").write_text(text)
    if name != "peers_study":  # every comparison of the default with its peers, on whatever base and seeds
        (RESULTS / f"{name}_summary.md").write_text(summary(merged, complete=name == "peers"))
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"any of {', '.join(TASKS)} (default: all)")
    parser.add_argument("--methods", default=",".join(MAIN), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--ps", default="0.5,0.75")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--study",
        action="store_true",
        help="the ranking study instead (STUDY), written to benchmarks/results/peers_study.md",
    )
    parser.add_argument(
        "--results",
        default="peers",
        help="the results' name: benchmarks/results/<name>.json and .md (runs on a base that did not rebuild bit for "
        "bit go in a file of their own: a merge keeps only rows made on the same dense base)",
    )
    parser.add_argument("--tables-only", action="store_true", help="render the markdown from the JSON, run nothing")
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="tabulate only the rows whose runs (every seed) are in runs/bench-peers; train nothing but a missing base",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    name = "peers_study" if args.study else args.results
    if args.tables_only:
        print(write_results(name, {}))
        return
    plan = STUDY if args.study else {task: (args.ps, args.methods.split(",")) for task in args.tasks.split(",")}
    unknown = [t for t in plan if t not in TASKS] + [m for _, ms in plan.values() for m in ms if m not in METHODS]
    if unknown:
        parser.error(f"unknown task or method {unknown[0]!r}")
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    text = ""
    for task, (ps, methods) in plan.items():
        entry = run_task(task, [float(p) for p in ps.split(",")], methods, seeds, args.cached_only)
        text = write_results(name, {task: entry})  # each part as soon as it is done
    print(text)


if __name__ == "__main__":
    sys.exit(main())
