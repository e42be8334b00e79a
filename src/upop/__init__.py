"""UPop: Unified and Progressive Pruning of vision and vision-language Transformers.

The public names below load on first use (PEP 562), so ``import upop.core`` loads the core alone: no model family,
task or job comes with it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers and the API reference
    from upop.adapters import Adapter, BlockSpec, Pruner, apply_plan, register_adapter, registered_adapters
    from upop.core.config import PAPER_RANKING, PruneConfig
    from upop.core.plan import Plan, save_compressed
    from upop.core.profile import measure_latency, profile
    from upop.errors import UPopError
    from upop.jobs.deploy import load_compressed
    from upop.jobs.pretrained import load_model

_PUBLIC = {
    "Adapter": "upop.adapters",
    "BlockSpec": "upop.adapters",
    "Pruner": "upop.adapters",
    "apply_plan": "upop.adapters",
    "register_adapter": "upop.adapters",
    "registered_adapters": "upop.adapters",
    "PAPER_RANKING": "upop.core.config",
    "PruneConfig": "upop.core.config",
    "Plan": "upop.core.plan",
    "save_compressed": "upop.core.plan",
    "measure_latency": "upop.core.profile",
    "profile": "upop.core.profile",
    "UPopError": "upop.errors",
    "load_compressed": "upop.jobs.deploy",
    "load_model": "upop.jobs.pretrained",
}
__all__ = [
    "PAPER_RANKING",
    "Adapter",
    "BlockSpec",
    "Plan",
    "PruneConfig",
    "Pruner",
    "UPopError",
    "apply_plan",
    "load_compressed",
    "load_model",
    "measure_latency",
    "profile",
    "register_adapter",
    "registered_adapters",
    "save_compressed",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'upop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
