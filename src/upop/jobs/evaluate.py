"""The evaluate job: metrics on the report split, params, FLOPs and latency of a compressed directory (plan +
weights) or of a dense checkpoint."""

from __future__ import annotations

from upop.errors import UPopError
from upop.jobs.common import RunConfig, example_inputs, measure, prepare
from upop.jobs.report import Evaluation


def evaluate(cfg: RunConfig, compressed: str | None = None, pretrained: str | None = None) -> Evaluation:
    """Report-split metrics, params, FLOPs and latency of a compressed directory (the architecture the flags name,
    built on the meta device: no dense weights are read) or of a dense checkpoint."""
    if (compressed is None) == (pretrained is None):
        raise UPopError("evaluate needs exactly one of --compressed DIR or --pretrained FILE")
    setup = prepare(cfg, pretrained, compressed)
    m = measure(setup.model, setup, example_inputs(setup, setup.model))
    loaded = setup.loaded.summary() if setup.loaded is not None and pretrained is not None else None
    return Evaluation(m.metrics, m.params, m.flops, m.latency_ms, split=setup.splits["report"], pretrained=loaded)
