"""The end-of-run report: dense vs compressed metric, params, FLOPs, latency, kept fractions per tower and kind, and a
heatmap of the kept fraction per layer (layers x {tower attn, tower mlp})."""

from __future__ import annotations

import io
import re
from typing import Any


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def comparison_table(report: dict[str, Any]) -> str:
    """A markdown table from a compress report (see ``upop.run.compress``)."""
    dense, comp = report["dense"], report["compressed"]
    rows = [("metric", "dense", "compressed", "ratio")]
    for name in dense["metrics"]:
        d, c = dense["metrics"][name], comp["metrics"][name]
        rows.append((name, f"{d:.2f}", f"{c:.2f}", f"{c / d:.3f}" if d else "-"))
    if report.get("searched_metrics"):
        for name, v in report["searched_metrics"].items():
            rows.append((f"{name} after search, before retraining", "", f"{v:.2f}", ""))
    rows.append(
        ("params", _human(dense["params"]), _human(comp["params"]), f"{dense['params'] / comp['params']:.2f}x smaller")
    )
    rows.append(
        (
            "FLOPs / sample",
            _human(dense["flops"]),
            _human(comp["flops"]),
            f"{dense['flops'] / comp['flops']:.2f}x fewer",
        )
    )
    rows.append(
        (
            f"latency, batch {report['latency_batch']} ({report['device']})",
            f"{dense['latency_ms']:.2f} ms",
            f"{comp['latency_ms']:.2f} ms",
            f"{dense['latency_ms'] / comp['latency_ms']:.2f}x faster",
        )
    )
    rows.append(("kept attention dims", "1.000", f"{report['kept']['attn']:.3f}", ""))
    rows.append(("kept MLP neurons", "1.000", f"{report['kept']['mlp']:.3f}", ""))
    by_tower = report.get("kept_by_tower") or {}
    if len(by_tower) > 1:
        for tower, kinds in by_tower.items():
            for kind, label in (("attn", "attention dims"), ("mlp", "MLP neurons")):
                if kind in kinds:
                    rows.append((f"kept {tower} {label}", "1.000", f"{kinds[kind]:.3f}", ""))
    rows.append(
        ("pruned share of prunable cost", "", f"{report['pruned_cost_fraction']:.4f}", f"target p={report['p']}")
    )
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


def layer_of(name: str) -> int:
    """The block index in a structure's module name: its last integer component (0 if none)."""
    numbers = [int(part) for part in name.split(".") if re.fullmatch(r"\d+", part)]
    return numbers[-1] if numbers else 0


def kept_grid(per_structure: list[dict[str, Any]]) -> tuple[list[str], list[int], list[list[float | None]]]:
    """(column labels "tower kind", layer indices, grid[layer][column] of kept fractions, None where absent)."""
    columns = sorted({(s.get("tower", "vision"), s["kind"]) for s in per_structure})
    layers = sorted({layer_of(s["name"]) for s in per_structure})
    grid: list[list[float | None]] = [[None] * len(columns) for _ in layers]
    for s in per_structure:
        row, col = layers.index(layer_of(s["name"])), columns.index((s.get("tower", "vision"), s["kind"]))
        grid[row][col] = s["kept"] / s["size"]
    return [f"{t} {k}" for t, k in columns], layers, grid


def heatmap_png(per_structure: list[dict[str, Any]], title: str) -> bytes:
    """A PNG heatmap of the kept fraction per layer and (tower, kind): where the search spent the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, layers, grid = kept_grid(per_structure)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 1.2 + 0.45 * len(layers)))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    for r in range(len(layers)):
        for c in range(len(labels)):
            if not np.isnan(values[r, c]):
                ax.text(c, r, f"{values[r, c]:.2f}", ha="center", va="center", color="w" if values[r, c] < 0.6 else "k")
    ax.set_title(f"kept fraction: {title}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
