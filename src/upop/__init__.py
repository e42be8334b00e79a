"""UPop: Unified and Progressive Pruning of vision and vision-language Transformers."""

from upop.adapters import Adapter, BlockSpec, Pruner, apply_plan, register_adapter, registered_adapters
from upop.core.config import PAPER_RANKING, PruneConfig
from upop.core.plan import Plan, save_compressed
from upop.core.profile import measure_latency, profile
from upop.jobs.deploy import load_compressed
from upop.errors import UPopError

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
    "measure_latency",
    "profile",
    "register_adapter",
    "registered_adapters",
    "save_compressed",
]
__version__ = "0.1.0"
