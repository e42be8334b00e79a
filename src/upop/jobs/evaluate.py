"""The evaluate job: metrics on the report split, params, FLOPs and latency of a compressed directory (plan +
weights) or of a dense checkpoint."""

from __future__ import annotations

from upop.errors import UPopError
from upop.jobs.common import RunConfig, example_inputs, measure, prepare
from upop.jobs.report import Evaluation
from upop.models import carries_weights


def evaluate(cfg: RunConfig, compressed: str | None = None, pretrained: str | None = None) -> Evaluation:
    """Report-split metrics, params, FLOPs and latency of a compressed directory (the architecture the flags name,
    built on the meta device: no dense weights are read) or of a dense checkpoint."""
    if compressed is not None and pretrained is not None:
        raise UPopError("evaluate takes one of --compressed DIR or --pretrained FILE, not both")
    if compressed is None and pretrained is None and not carries_weights(cfg.model):
        raise UPopError(
            f"evaluate needs --compressed DIR or --pretrained FILE: the model {cfg.model} holds no weights of its "
            "own (evaluated as they are: hf:DIR with weights, segmenter:DIR with its checkpoint.pth, "
            "open_clip:ARCH:WEIGHTS)"
        )
    setup = prepare(cfg, pretrained, compressed, training=False)
    m = measure(setup.model, setup, example_inputs(setup, setup.model))
    loaded = setup.loaded.summary() if setup.loaded is not None and pretrained is not None else None
    return Evaluation(m.metrics, m.params, m.flops, m.latency_ms, split=setup.splits["report"], pretrained=loaded)
