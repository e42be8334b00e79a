"""The end-of-run report: dense vs compressed metric, params, FLOPs, latency, kept fractions."""

from __future__ import annotations

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
    rows.append(
        ("pruned share of prunable cost", "", f"{report['pruned_cost_fraction']:.4f}", f"target p={report['p']}")
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
