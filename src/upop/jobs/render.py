"""The end-of-run report as text and pictures: dense vs compressed metric, params, FLOPs, latency, kept fractions
per tower and kind, and a heatmap of the kept fraction per layer (layers x {tower attn, tower mlp})."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from upop.data.config import PAPER_PROTOCOL
from upop.errors import UPopError
from upop.jobs.report import CompressReport
from upop.utils.extras import require


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def speed_text(speedup: float) -> str:
    """ "1.34x faster" or "1.85x slower" (never "0.54x faster"); three decimals where two would read 1.00."""
    ratio = speedup if speedup >= 1 else 1 / speedup
    digits = 3 if f"{ratio:.2f}" == "1.00" else 2
    return f"{ratio:.{digits}f}x " + ("faster" if speedup >= 1 else "slower")


def _split_text(about: dict[str, Any]) -> str:
    size = about.get("size", about.get("images"))
    parts = [about.get("source", "?")]
    if size is not None:
        parts.append(f"{size} {'images' if 'images' in about else 'samples'}")
    if "captions" in about:
        parts.append(f"{about['captions']} captions")
    if "seed" in about:
        parts.append(f"seed {about['seed']}, indices sha256 {about['indices_sha256']}")
    if "note" in about:
        parts.append(f"**{about['note']}**")
    return ", ".join(parts)


def _alignment_text(report: CompressReport) -> str:
    """ "widths multiples of 8 (head dims) / 1 (MLP), measured on cpu" or "... as given"."""
    a = report.alignment or {}
    attn, mlp = a.get("attn", report.prune.get("align_attn")), a.get("mlp", report.prune.get("align_mlp"))
    how = "as given" if a.get("device") in (None, "given") else f"auto, measured on {a['device']}"
    return f"kept widths multiples of {attn} (head dims) / {mlp} (MLP) ({how})"


def _kept_weights_text(report: CompressReport) -> str:
    """Which weights a compress run kept: the selected retraining epoch, the last one, or the searched subnet."""
    epochs, chosen = report.recipe.get("epochs"), report.compressed.epoch
    if not epochs:
        return "no retraining: the searched subnet"
    if report.selection.get("split"):
        metric = report.selection.get("metric")
        return f"retraining epoch {chosen} of {epochs}, chosen by {metric} on the select split" + selection_text(
            report.selection
        )
    return f"the last retraining epoch ({epochs}; no selection split)"


def selection_text(selection: dict) -> str:
    """ " (rule guarded: <reason>; the split's standard error 1.23 on 400 samples)", or "" for older reports."""
    if "kept_epoch" not in selection:
        return ""
    return (
        f" (rule {selection['rule']}: {selection['reason']}; the split's standard error "
        f"{selection['standard_error']:.2f} on {selection['size']} samples)"
    )


def report_header(report: CompressReport) -> str:
    """What produced a compress report: model, data and splits, selection, pruning settings, recipe, machine."""
    splits, recipe, prune, data = report.splits, report.recipe, report.prune, report.data
    source = data.get("root") or (
        f"built-in shapes world ({data.get('train_size')} train / {data.get('val_size')} val scenes, "
        f"seed {data.get('seed')}, noise {data.get('noise')})"
    )
    distill = (
        f"distillation from the dense model (weight {recipe['distill']}, temperature {recipe['temperature']})"
        if recipe.get("distill")
        else "no distillation"
    )
    lines = [
        f"# UPop: {report.model} on {report.task}, p = {report.p}",
        "",
        *(
            [f"- **{PAPER_PROTOCOL}**: the best epoch was picked on the split reported below"]
            if data.get("select_on") == "report"
            else []
        ),
        f"- data: {source}; training augmentation {splits.get('train', {}).get('augment', 'none')}",
        f"- train split: {_split_text(splits.get('train', {}))}",
        f"- select split: {_split_text(splits['select']) if 'select' in splits else 'none'}",
        f"- report split: {_split_text(splits.get('report', {}))} (every metric below is on this split)",
        f"- kept weights: {_kept_weights_text(report)}",
        f"- pruning: p = {report.p} of the prunable {_cost_text(report)}, {report.allocation} "
        f"allocation, {_alignment_text(report)}, T = {prune.get('total_steps')} "
        f"search steps, {report.rerankings} re-rankings; {_ranking_text(report)}",
        f"- recipe: search {recipe.get('epochs_search')} epoch(s) at lr {recipe.get('lr_search')} "
        f"({recipe.get('search_schedule')}), retraining {recipe.get('epochs')} epoch(s) at lr {recipe.get('lr')} "
        f"({recipe.get('schedule', 'cosine')}), {recipe.get('optimizer', 'adamw')} with weight decay "
        f"{recipe.get('weight_decay', 0.05)}, {distill}; seed {report.seed}, batch {report.batch_size} per rank, "
        f"amp {'on' if report.amp else 'off'}",
        f"- machine: {report.device} x {report.world_size} process(es); upop "
        f"{report.upop_version}, torch {report.torch_version}; {report.date}",
    ]
    return "\n".join(lines)


def _cost_text(report: CompressReport) -> str:
    """What the budget counts: "params", "flops", "latency", or the original's constants."""
    if report.cost == "paper":
        return f"cost in the original's units ({report.prune.get('attn_cost', 0):.6g} per head dim, 1 per neuron)"
    return str(report.cost)


def _ranking_text(report: CompressReport) -> str:
    """The ranking a compress run used, and how settled it ended (or that a given plan replaced the search)."""
    if report.given_plan:
        return "no search: a given plan"
    prune = report.prune
    text = (
        f"ranking: {prune.get('score', 'gradient')} score standardised per {prune.get('standardise', 'kind')}, "
        f"floor {prune.get('floor', 0.0)} of the uniform share"
    )
    stability = report.stability or {}
    if stability.get("rank_correlation") is not None:
        text += f" (last two re-rankings: rank correlation {stability['rank_correlation']:.2f})"
    return text


Row = tuple[str, str, str, str]


def _metric_rows(report: CompressReport) -> list[Row]:
    """Report-split metrics: the kept epoch's against dense, the last epoch's, the subnet's right after the search."""
    dense, comp, split = report.dense, report.compressed, "report split"
    rows = []
    for name in dense.metrics:
        d, c = dense.metrics[name], comp.metrics[name]
        label = f"{name} ({split}{f', epoch {comp.epoch}' if comp.epoch else ''})"
        rows.append((label, f"{d:.2f}", f"{c:.2f}", f"{c / d:.3f}" if d else "-"))
    last = report.compressed_last
    if last.metrics and last.epoch and last.epoch != comp.epoch:
        for name, v in last.metrics.items():
            d = dense.metrics[name]
            rows.append((f"{name} ({split}, last epoch {last.epoch})", "", f"{v:.2f}", f"{v / d:.3f}" if d else "-"))
    if report.searched_metrics and comp.epoch:
        for name, v in report.searched_metrics.items():
            rows.append((f"{name} after search, before retraining", "", f"{v:.2f}", ""))
    return rows


def _cost_rows(report: CompressReport) -> list[Row]:
    """Size, FLOPs and latency of dense and compressed."""
    dense, comp, speed = report.dense, report.compressed, report.speed
    return [
        ("params", _human(dense.params), _human(comp.params), f"{dense.params / comp.params:.2f}x smaller"),
        ("FLOPs / sample", _human(dense.flops), _human(comp.flops), f"{dense.flops / comp.flops:.2f}x fewer"),
        (
            f"latency, batch {speed.batch} ({speed.device}, back to back)",
            f"{speed.dense_ms:.2f} ms",
            f"{speed.compressed_ms:.2f} ms",
            speed_text(speed.speedup) + (" (SLOWER than dense)" if speed.speedup < 1 else ""),
        ),
    ]


def _kept_rows(report: CompressReport) -> list[Row]:
    """What was kept: per kind, per tower and kind, each mixed-granularity block's shape, the pruned share."""
    attn_unit = unit_of("attn", report.granularity)
    rows = [
        (f"kept attention {attn_unit}", "1.000", f"{report.kept['attn']:.3f}", ""),
        ("kept MLP neurons", "1.000", f"{report.kept['mlp']:.3f}", ""),
    ]
    if len(report.kept_by_tower) > 1:
        for tower, kinds in report.kept_by_tower.items():
            for kind, label in (("attn", f"attention {attn_unit}"), ("mlp", "MLP neurons")):
                if kind in kinds:
                    rows.append((f"kept {tower} {label}", "1.000", f"{kinds[kind]:.3f}", ""))
    shapes = [f"{s['heads']}x{s['head_dim']}" for s in report.per_structure if "heads" in s]
    if shapes:  # mixed granularity: each attention block's kept heads x head_dim, in model order
        rows.append(("kept attention heads x head_dim", "", ", ".join(shapes), ""))
    rows.append(("pruned share of prunable cost", "", f"{report.pruned_cost_fraction:.4f}", f"target p={report.p}"))
    table = report.latency_cost
    if table:
        rows.append(
            (
                "latency of the pruned structures (cost table)",
                f"{table['dense_ms']:.3f} ms",
                f"{table['kept_ms']:.3f} ms",
                f"target {table['target_ms']:.3f} ms",
            )
        )
    return rows


def comparison_table(report: CompressReport) -> str:
    """A markdown table from a compress report: report-split metrics of the dense model, the kept (selected) epoch,
    the last epoch and the subnet right after the search; size, FLOPs, latency, kept shares."""
    rows = [("metric", "dense", "compressed", "ratio"), *_metric_rows(report), *_cost_rows(report)]
    rows += _kept_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def kept_by_tower(per_structure: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{tower: {kind: kept elements / dense elements}} from a report's ``per_structure`` rows."""
    totals: dict[str, dict[str, list[int]]] = {}
    for s in per_structure:
        entry = totals.setdefault(s.get("tower", "vision"), {}).setdefault(s["kind"], [0, 0])
        entry[0] += s["kept"]
        entry[1] += s["size"]
    return {t: {k: v[0] / v[1] for k, v in kinds.items()} for t, kinds in totals.items()}


def _numbers(name: str) -> list[int]:
    return [int(part) for part in name.split(".") if re.fullmatch(r"\d+", part)]


def layer_of(name: str) -> int:
    """The block index in a structure's module name: its first integer component (0 if none)."""
    numbers = _numbers(name)
    return numbers[0] if numbers else 0


def branch_of(name: str) -> str:
    """What tells apart structures of one kind in one block (e.g. the twin cross-attention branches ``.0``/``.1``
    of NLVR): the integer components after the block index, or "" when there are none."""
    return ".".join(str(n) for n in _numbers(name)[1:])


def unit_of(kind: str, granularity: str = "dim") -> str:
    """What one element of a structure is: "dims", "heads" or "head x dim pairs" (attention), "neurons" (MLP)."""
    if kind == "mlp":
        return "neurons"
    return {"head": "heads", "mixed": "head x dim pairs"}.get(granularity, "dims")


def kept_grid(
    per_structure: list[dict[str, Any]],
) -> tuple[list[str], list[int], list[list[tuple[int, int] | None]]]:
    """(column labels, layer indices, grid[layer][column] of (kept, size), None where absent). Columns are
    (tower, kind, branch); the tower is named only when the model has several, the branch only where a block has
    several structures of one kind (NLVR's twin cross-attention)."""

    def column(s: dict[str, Any]) -> tuple[str, str, str]:
        return s.get("tower", "vision"), s["kind"], branch_of(s["name"])

    columns = sorted({column(s) for s in per_structure})
    units = {s["kind"]: s.get("unit", unit_of(s["kind"])) for s in per_structure}
    layers = sorted({layer_of(s["name"]) for s in per_structure})
    grid: list[list[tuple[int, int] | None]] = [[None] * len(columns) for _ in layers]
    for s in per_structure:
        grid[layers.index(layer_of(s["name"]))][columns.index(column(s))] = (s["kept"], s["size"])
    several = len({t for t, _, _ in columns}) > 1
    names = {k: f"{'attention' if k == 'attn' else 'MLP'} {units[k]}" for k in units}
    labels = [(f"{t} {names[k]}" if several else names[k]) + (f" ({b})" if b else "") for t, k, b in columns]
    return labels, layers, grid


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's log.jsonl; UPopError naming the file when it is missing or not JSON lines."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UPopError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UPopError(f"{path} is not a UPop log (JSON lines): line {e.lineno}: {e.msg}") from None


def progress_png(records: list[dict[str, Any]], title: str) -> bytes:
    """A PNG of the search's progress from its log records: pi (the pruned share of the cost the schedule asks
    for) and the kept fraction per kind, and per kind and tower for a model of several towers, over the steps."""
    search = [r for r in records if r.get("phase") == "search" and "pi" in r]
    if not search:
        raise UPopError("the log holds no search steps to plot (a `upop compress` run logs them)")
    matplotlib = require("matplotlib", "the search-progress picture")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in search]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    left.plot(steps, [r["pi"] for r in search], label="pi (schedule)", color="k")
    left.plot(steps, [r["pruned_cost"] for r in search], label="pruned share of the cost", linestyle="--")
    left.set_xlabel("search step")
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    towers = sorted({key for r in search for key in r.get("kept_by_tower", {})})
    series = {f"kept {k}": [r[f"kept_{k}"] for r in search] for k in ("attn", "mlp")}
    series.update({f"kept {key}": [r.get("kept_by_tower", {}).get(key) for r in search] for key in towers})
    for label, values in series.items():
        right.plot(steps, values, label=label, linestyle="-" if label.count("_") == 0 else ":")
    right.set_xlabel("search step")
    right.set_ylim(0, 1.02)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(f"search progress: {title}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def heatmap_png(per_structure: list[dict[str, Any]], title: str) -> bytes:
    """A PNG heatmap of the kept fraction per layer and (tower, kind): where the search spent the budget."""
    matplotlib = require("matplotlib", "the kept-structure picture")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, layers, grid = kept_grid(per_structure)
    values = np.array([[np.nan if v is None else v[0] / v[1] for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(labels), 1.2 + 0.55 * len(layers)))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    for r in range(len(layers)):
        for c in range(len(labels)):
            if grid[r][c] is not None:
                kept, size = grid[r][c]
                colour = "w" if values[r, c] < 0.6 else "k"
                ax.text(c, r, f"{kept}/{size}\n{values[r, c]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_title(f"kept per layer (kept/dense, fraction): {title}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
