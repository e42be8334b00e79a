"""The markdown tables of the results that only have raw values (JSON): the GPU check's speed tables, its width
sweep, and the search-step cost. Each table is written beside its JSON under benchmarks/results/ and included by the
docs from there, so a table exists in one place only and always says what its JSON says.

    python benchmarks/tables.py            # every table whose JSON is present (make docs and make bench run it)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SETTINGS = (  # the speed table's rows: the key in the JSON, the short label, the long one (first model only)
    ("default_auto", None, None),
    ("elementwise", "element-wise", "element-wise (align 1, the paper's)"),
    ("aligned_8_32", "aligned 8/32", "aligned 8/32"),
    ("whole_heads", "whole heads", "whole heads (`--granularity head`)"),
    ("latency_cost", "latency cost", "latency cost (`--cost latency`)"),
    ("uniform_dims_hand_sliced", "uniform 2x dims, hand-sliced", "uniform 2x dims, hand-sliced"),
    ("uniform_heads_hand_sliced", "uniform 2x heads, hand-sliced", "uniform 2x heads, hand-sliced"),
)
CONDITIONS = ("autocast", "fp32", "autocast_batch1")  # bf16 at the check's batch, fp32, bf16 at batch 1
SAYS_SLOWER_IN_BOLD = {"default_auto", "elementwise"}  # the rows a slowdown must not hide in
MODEL_NAMES = {
    "timm:deit_small_patch16_224": "DeiT-S",
    "timm:deit_base_patch16_224": "DeiT-B",
    "hf-clip:B16": "CLIP B/16",
}
SHOWN_WIDTHS = {  # the width sweep's columns: what the docs discuss, not every width measured
    "attention": ("head_dim", "head_dim", "attention time", (64, 63, 60, 57, 56, 52, 48, 47, 40, 33, 32, 31, 24, 16)),
    "mlp": ("hidden", "MLP hidden", "MLP time", (3072, 3071, 3064, 3008, 2048, 2047, 2040, 1536, 1535, 1528, 1024)),
}
SEARCH_COST_NAMES = {"vit-tiny": "vit-tiny (classification)", "clip-tiny": "clip-tiny (retrieval, both towers)"}


def speedup(value: float, bold: bool) -> str:
    """A speed-up as "1.42x", a slowdown as "1.85x slower" (in bold where it must not be missed)."""
    if value >= 1:
        return f"{value:.2f}x"
    text = f"{1 / value:.2f}x slower"
    return f"**{text}**" if bold else text


def _row_cells(speed: dict, towers: list[str], key: str) -> list[str]:
    return [" / ".join(speedup(speed[t][c][key], key in SAYS_SLOWER_IN_BOLD) for t in towers) for c in CONDITIONS]


def gpu_speed(result: dict) -> str:
    """gpu.json: per model (and tower), the speed-up over dense of every setting in each condition."""
    lines = ["| model, tower | setting | bf16, batch 256 | fp32, batch 256 | bf16, batch 1 |", "|---|---|---|---|---|"]
    for i, model in enumerate(result["models"]):
        align = model["search"]["default_auto"]["alignment"]
        towers = list(model["speedup"])
        name = MODEL_NAMES.get(model["model"], model["model"]) + (
            "" if towers == ["image"] else " " + " / ".join(towers)
        )
        for j, (key, short, long) in enumerate(SETTINGS):
            label = (
                f"**default** (align auto, resolved to {align['attn']}/{align['mlp']} here)" if short is None else None
            )
            label = label or (long if i == 0 else short)
            lines.append(
                f"| {name if j == 0 else ''} | {label} | "
                + " | ".join(_row_cells(model["speedup"], towers, key))
                + " |"
            )
        for tower in towers:
            compiled = model["speedup"][tower].get("autocast_compiled")
            if compiled:
                lines.append(
                    f"| | default, both compiled (`torch.compile`) | {speedup(compiled['default_auto'], False)} | | |"
                )
    return "\n".join(lines) + "\n"


def gpu_blip_speed(result: dict) -> str:
    """gpu_blip.json: BLIP NLVR at 2x, the speed-up over dense of every setting in each condition."""
    model = result["models"][0]
    align, batch = model["search"]["default_auto"]["alignment"], model["batch"]
    lines = [f"| BLIP NLVR, 2x | bf16, batch {batch} | fp32, batch {batch} | bf16, batch 1 |", "|---|---|---|---|"]
    for key, short, _ in SETTINGS:
        label = short or f"**default** (align auto: {align['attn']} for attention, {align['mlp']} for MLP here)"
        lines.append(f"| {label} | " + " | ".join(_row_cells(model["speedup"], ["model"], key)) + " |")
    return "\n".join(lines) + "\n"


def gpu_widths(result: dict) -> str:
    """gpu_widths.json: in bf16, each width's time as a share of the dense width's, one table per kind."""
    out = []
    for kind, (key, head, label, widths) in SHOWN_WIDTHS.items():
        share = {e[key]: e["time_share"] for e in result[kind] if e["precision"] == "bf16"}
        out += [
            f"| {head} | " + " | ".join(map(str, widths)) + " |",
            "|---|" + "---|" * len(widths),
            f"| {label} | " + " | ".join(f"{share[w]:.2f}" for w in widths) + " |",
            "",
        ]
    return "\n".join(out)


def search_cost(result: dict) -> str:
    """search_cost.json: a search step against a plain one in time, aten ops and memory."""
    lines = [
        "| model | step, plain / search | ratio | aten ops per step, plain / search | added per masked projection "
        "| memory, plain / search | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        s, a, mem = m["step_s"], m["aten_ops"], m["memory"]
        lines.append(
            f"| {SEARCH_COST_NAMES.get(name, name)} | {s['plain'] * 1e3:.1f} / {s['search'] * 1e3:.1f} ms "
            f"| {s['ratio']:.2f}x | {a['plain']} / {a['search']} (+{(a['ratio'] - 1) * 100:.0f}%) "
            f"| {a['added_per_slot']:.1f} ({a['masked_slots']} projections) "
            f"| {mem['plain']['total_mib']:.1f} / {mem['search']['total_mib']:.1f} MiB | {mem['total_ratio']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def gpu_check(result: dict) -> str:
    """gpu_check.py's own table of a run: every searched row with its attention shapes (imported when used: it needs
    torch)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_check import markdown

    return markdown(result)


TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {  # table file -> (its JSON, its renderer)
    "gpu_check_vit.md": ("gpu_check_vit.json", gpu_check),
    "gpu_check_segmenter_before.md": ("gpu_check_segmenter_before.json", gpu_check),
    "gpu_check_after.md": ("gpu_check_after.json", gpu_check),
    "gpu_speed.md": ("gpu.json", gpu_speed),
    "gpu_blip_speed.md": ("gpu_blip.json", gpu_blip_speed),
    "gpu_widths.md": ("gpu_widths.json", gpu_widths),
    "search_cost.md": ("search_cost.json", search_cost),
}


def main(results: Path = RESULTS) -> list[Path]:
    written = []
    for table, (source, render) in TABLES.items():
        path = results / source
        if path.is_file():
            (results / table).write_text(render(json.loads(path.read_text())))
            written.append(results / table)
    return written


if __name__ == "__main__":
    for path in main():
        print(f"wrote {path}")
