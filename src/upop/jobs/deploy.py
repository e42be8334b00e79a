"""Deploying a compressed model: load it from its directory alone (no dense weights read or allocated), and export it
to ONNX."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from upop.adapters import find_adapter
from upop.core import plan as P
from upop.core.profile import call_model
from upop.errors import UPopError
from upop.jobs.common import RunConfig, compressed_bundle
from upop.models import ModelBundle
from upop.tasks import get_task
from upop.utils.extras import require
from upop.utils.files import atomic_write


def load_compressed(
    model_or_directory: nn.Module | Callable[[], nn.Module] | str | os.PathLike,
    directory: str | os.PathLike | None = None,
) -> nn.Module:
    """The compressed model saved in a directory.

    - ``load_compressed(directory)``: a directory written by ``upop compress``: the architecture is built from its
      ``config.json`` (model spec, outputs, input size) with parameters on the meta device, sliced by ``plan.json``,
      and filled from ``model.safetensors``. No dense weights are read or allocated (a CLIP-L user does not read 856M
      dense parameters to load a 474M model), and an ``hf:``/``open_clip:`` spec's weight files need not exist.
      ``compressed_directory`` gives its bundle (with the tokenizer).
    - ``load_compressed(build, directory)``: ``build()`` makes the dense architecture (called with parameters on the
      meta device), for models of the user's own.
    - ``load_compressed(dense_model, directory)``: a fresh dense model, sliced in place.
    """
    if directory is None:
        return compressed_directory(model_or_directory).model
    return P.load_compressed(model_or_directory, directory, find_adapter)


def compressed_directory(directory: str | os.PathLike) -> ModelBundle:
    """The bundle of a directory written by ``upop compress``: its compressed model (see ``load_compressed``) with
    the tokenizer, input size and normalisation of the model spec its config.json names."""
    directory = Path(directory)
    P.read_plan(directory)  # a directory without a plan is not a compressed model, whatever else it holds
    path = directory / "config.json"
    if not path.is_file():
        raise UPopError(
            f"{directory} has no config.json, so it was not written by `upop compress`; from Python, pass the "
            "dense model or a function that builds it: upop.load_compressed(model, directory)"
        )
    try:
        config = json.loads(path.read_text())
        cfg, outputs = RunConfig(**config["run"]), config["num_outputs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UPopError(f"{path} is not a upop compress configuration ({e})") from None
    return compressed_bundle(cfg, outputs, torch.device("cpu"), str(directory))


def export_onnx(directory: str | os.PathLike, output: str | os.PathLike, batch: int = 2) -> dict[str, float]:
    """Export the compressed model in ``directory`` (written by ``upop compress``) to ONNX at ``output`` with a dynamic
    batch dimension (torch's exporter); then run it with onnxruntime on the CPU on example inputs and compare with
    PyTorch. Returns {"max_abs_diff", "outputs"}; refuses, writing nothing, if they disagree beyond 1e-4 of the
    output scale."""
    import numpy as np

    for module in ("onnx", "onnxscript", "onnxruntime"):  # before the export's work
        require(module, "ONNX export")
    directory, output = Path(directory), Path(output)
    bundle = compressed_directory(directory)
    model, size = bundle.model.eval(), bundle.image_size or 224
    task = get_task(json.loads((directory / "config.json").read_text())["run"]["task"], bundle)
    inputs = task.example_inputs(torch.randn(batch, 3, size, size), model)
    if not isinstance(inputs, dict):  # positional inputs: name them as the forward does
        inputs = _as_keywords(model, inputs)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on axis names are not the user's concern
            program = torch.onnx.export(
                model,
                (),
                kwargs=inputs,
                dynamic_shapes={k: {0: torch.export.Dim("batch")} for k in inputs},
                dynamo=True,
                verbose=False,
            )
            program.save(str(tmp))
            expected = [t.numpy() for t in _tensors(call_model(model, inputs))]
        got = _run_onnx(tmp, inputs)
        diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
        scale = max(float(np.abs(e).max()) for e in expected)
        if len(got) != len(expected) or diff > 1e-4 * max(1.0, scale):
            raise UPopError(f"the ONNX model disagrees with PyTorch by {diff:.3g} on example inputs; nothing written")
        atomic_write(output, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return {"max_abs_diff": diff, "outputs": len(expected)}


def _as_keywords(model: nn.Module, inputs) -> dict:
    import inspect

    values = (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
    names = [n for n in inspect.signature(model.forward).parameters if n not in ("self", "args", "kwargs")]
    return dict(zip(names, values))


def _run_onnx(path: Path, feed: dict) -> list:
    onnxruntime = require("onnxruntime", "ONNX export")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v.numpy() for k, v in feed.items() if k in wanted})


def _tensors(output) -> list:
    """The tensors of a model output (a tensor, a tuple or an HF ModelOutput), in order, as ONNX lists them."""
    if torch.is_tensor(output):
        return [output]
    values = output.to_tuple() if hasattr(output, "to_tuple") else output
    return [t for v in values for t in _tensors(v)]
