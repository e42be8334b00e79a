"""--grad-checkpointing: every family's blocks are recomputed in the backward pass (more module calls), and the
gradients (the masks' and the weights') are those without it, bitwise: a mask's gradient is not counted twice, so
the importance and the choices are the same. Dropout and drop path draw the same in the recomputation."""

from __future__ import annotations

import pytest
import torch
from helpers import ELEMENTWISE, hf_vit, images, logits, open_clip_model

import upop
from upop.data.config import DataConfig
from upop.engine.loaders import make_loaders
from upop.errors import UPopError
from upop.models import build as build_bundle
from upop.models import checkpointing
from upop.models.regularise import regularise
from upop.tasks import get_task
from upop.utils.dist import DistInfo

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
TASKS = [
    ("classification", "vit-micro"),  # timm
    ("retrieval", "clip-micro"),  # HF CLIP
    ("retrieval", "blip-micro"),  # BLIP: HF vision and text towers
    ("nlvr", "blip-micro"),  # BLIP NLVR: the project's own twin cross-attention layers
    ("caption", "blip-micro"),  # BLIP decoder
    ("vqa", "blip-micro"),
    ("segmentation", "segmenter-micro"),  # the project's own block loops
]


class CallCount:
    """Counts every module call while active (a recomputed block calls its modules again in the backward)."""

    def __enter__(self) -> CallCount:
        self.calls = 0

        def hook(*_):
            self.calls += 1

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _gradients(model, pruner, loss_fn) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], int]:
    for p in [*model.parameters(), *pruner.masks]:
        p.grad = None
    torch.manual_seed(7)  # dropout and drop path draw the same in both passes
    with CallCount() as count:
        loss_fn().backward()
    weights = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [m.grad.clone() for m in pruner.masks], weights, count.calls


def assert_same_gradients_and_recomputed(model, loss_fn, example=None) -> None:
    model.train()
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10, **ELEMENTWISE), example_inputs=example)
    plain_masks, plain_weights, plain_calls = _gradients(model, pruner, loss_fn)
    checkpointing.enable(model)
    masks, weights, calls = _gradients(model, pruner, loss_fn)
    assert calls > plain_calls, "nothing was recomputed"
    assert all(g.abs().sum() > 0 for g in plain_masks)
    for a, b in zip(plain_masks, masks):
        assert torch.equal(a, b)
    assert plain_weights.keys() == weights.keys()
    assert all(torch.equal(plain_weights[k], weights[k]) for k in weights)
    pruner.detach()


@pytest.mark.parametrize("task_name, spec", TASKS, ids=[f"{t}-{s}" for t, s in TASKS])
def test_every_task_s_model_recomputes_its_blocks_with_the_same_gradients(task_name, spec):
    torch.manual_seed(0)
    kind = get_task(task_name).model_kind
    cls = type(get_task(task_name))
    bundle = build_bundle(spec, kind, cls.num_outputs(DataConfig(image_size=16)), 16)
    regularise(bundle.model, 0.1, 0.1 if "blip" in spec else None)  # the recomputation must redraw the same
    task = get_task(task_name, bundle)
    splits = task.datasets(DataConfig(image_size=16, train_size=8, val_size=4, select_size=0))
    loader = make_loaders(splits, 4, CPU, seed=0).train
    loader.sampler.set_position(0, 0)
    batch = task.train_batch(next(iter(loader)))
    example = task.example_inputs(batch, bundle.model)
    loss = lambda: task.loss_from(task.outputs(bundle.model, batch), batch)  # noqa: E731
    assert_same_gradients_and_recomputed(bundle.model, loss, example)


def test_an_hf_vit_and_an_open_clip_model_recompute_with_the_same_gradients():
    torch.manual_seed(0)
    vit = hf_vit()
    assert_same_gradients_and_recomputed(vit, lambda: logits(vit(images(2))).square().mean(), images(2))
    clip = open_clip_model()
    assert_same_gradients_and_recomputed(clip, lambda: logits(clip(images(2))).square().mean(), images(2))


def test_a_model_without_blocks_to_recompute_is_refused_in_one_line():
    with pytest.raises(UPopError, match="--grad-checkpointing: a Sequential has no blocks"):
        checkpointing.enable(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.e2e
def test_a_compress_run_with_grad_checkpointing_ends_as_one_without(tmp_path):
    from helpers import assert_same_result

    from upop.cli import main

    argv = "compress --model vit-micro --train-size 64 --val-size 16 --batch-size 16 --epochs-search 1 --epochs 1"
    argv += " --drop-path 0.1"
    assert main([*argv.split(), "--output-dir", str(tmp_path / "plain")]) == 0
    assert main([*argv.split(), "--grad-checkpointing", "--output-dir", str(tmp_path / "recomputed")]) == 0
    assert_same_result(tmp_path / "plain", tmp_path / "recomputed")
