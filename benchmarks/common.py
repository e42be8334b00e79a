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
