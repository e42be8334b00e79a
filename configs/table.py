"""Render configs/recipes.md, the table of every config's settings that docs/recipes.md includes:
``python configs/table.py`` (a test checks the file is what this renders from the configs)."""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DETAILS = (
    "augment",
    "momentum-distill",
    "clamp-temperature",
    "negatives-all-ranks",
    "rerank-k",
    "nlvr-swap",
    "text-dropout",
    "drop-path",
    "vqa-train-files",
    "answer-grouping",
    "window-stride",
    "multiscale-mode",
)


def _g(value: float) -> str:
    return f"{value:g}"


def row(path: Path) -> str:
    c = yaml.safe_load(path.read_text())
    script = c["about"]["follows"].split(" ")[0].removeprefix("scripts/")
    epochs = f"{c['epochs-search']} + {c['epochs']}"
    lrs = _g(float(c["lr-search"])) + (f" / {_g(float(c['lr']))}" if c["lr"] != c["lr-search"] else "")
    schedule = f"{c['lr-schedule-search']} / {c['lr-schedule']} to {_g(float(c['min-lr']))}"
    details = []
    for key in DETAILS:
        if key in c:
            value = c[key]
            value = ", ".join(value) if isinstance(value, list) else value
            details.append(key if value is True else f"{key} {value}")
    if "select-on" in c:
        details.append(f"select-on {c['select-on']}")
    if "select-size" in c:
        details.append(f"select-size {c['select-size']}")
    cells = [
        f"`{path.stem}`",
        script,
        c["task"],
        _g(c["p"]),
        epochs,
        lrs,
        str(c["global-batch-size"]),
        str(c["interval"]),
        str(c["image-size"]),
        f"{c['optimizer']}, {_g(float(c['weight-decay']))}",
        schedule,
        f"{c['attn-cost']} : 1",
        "; ".join(details),
    ]
    return "| " + " | ".join(cells) + " |"


def provenance(path: Path) -> str:
    about = yaml.safe_load(path.read_text())["about"]
    differences = "; ".join(about.get("differences", [])) or "none known"
    return f"| `{path.stem}` | {about['reproduces']} | {differences} |"


def render() -> str:
    head = (
        "| config | original script | task | p | epochs (search + retrain) | lr (search / retrain) | global batch "
        "| interval | image | optimizer, weight decay | LR schedule (search / retrain, to min) | cost (head dim : "
        "neuron) | training details |"
    )
    lines = [head, "|" + "---|" * 13]
    lines += [row(p) for p in sorted(HERE.glob("*.yaml"))]
    lines += ["", "| config | what it should reproduce | what still differs from the original |", "|---|---|---|"]
    lines += [provenance(p) for p in sorted(HERE.glob("*.yaml"))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (HERE / "recipes.md").write_text(render())
    print(f"wrote {HERE / 'recipes.md'}")
