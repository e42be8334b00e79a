"""Timing shared by the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from upop.core.profile import paired_latency  # noqa: F401  (the benchmarks' timing, shared with the library)


def emit_json(result: dict, out: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def variant_row(runs: Path, name: str) -> dict:
    """What a benchmark table reads from a run: the report-split metrics (after retraining), the metrics right after
    the search, the kept fraction per tower and the FLOPs, of the compress run ``runs/name``, or of the dense
    ``runs/base`` for ``name`` "dense"."""
    if name == "dense":
        dense = json.loads((runs / "base" / "report.json").read_text())
        return {"metrics": dense["metrics"], "searched": None, "kept": {}, "flops": None}
    r = json.loads((runs / name / "report.json").read_text())
    return {
        "metrics": r["compressed"]["metrics"],
        "searched": r["searched_metrics"],
        "kept": r["kept_by_tower"],
        "flops": r["compressed"]["flops"],
        "dense_flops": r["dense"]["flops"],
    }
