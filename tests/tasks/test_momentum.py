"""The retrieval training details of the paper's recipes: BLIP's momentum distillation (the moving average, the
queue's content after N steps, the soft targets, the compressed model's momentum copy, a checkpoint round trip), the
ramp of its weight, the temperature clamp, the re-ranking depth, and ITM hard negatives drawn from every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ELEMENTWISE, assert_same_result, build, images, logits, timm_vit

import upop
from upop.core.pruner import unmasked_copy
from upop.data.config import DataConfig
from upop.models import build as build_bundle
from upop.tasks import TaskOptions, get_task
from upop.tasks.retrieval import MOMENTUM, Momentum, encode_images, encode_texts, soft_targets


def test_the_queue_holds_every_batch_in_order_and_wraps_around():
    momentum = Momentum(size=10)
    start = momentum.queued(4, torch.device("cpu"))
    assert start["ids"].tolist() == [-100] * 10
    torch.testing.assert_close(start["image"].norm(dim=1), torch.ones(10))
    batches = [(torch.randn(4, 4), torch.randn(4, 4), torch.arange(4) + 10 * n) for n in range(3)]
    for image, text, ids in batches:
        momentum.enqueue(image, text, ids)
    queue = momentum.queued(4, torch.device("cpu"))
    # 12 entries in 10 slots: batch 0 at 0-3 (0-1 then overwritten by batch 2), batch 1 at 4-7, batch 2 at 8-9, 0-1
    order = [(2, 2), (2, 3), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
    for slot, (n, row) in enumerate(order):
        torch.testing.assert_close(queue["image"][slot], batches[n][0][row])
        torch.testing.assert_close(queue["text"][slot], batches[n][1][row])
        assert int(queue["ids"][slot]) == int(batches[n][2][row])
    assert momentum.pointer == 2


def test_the_momentum_model_is_the_moving_average_and_restarts_from_a_compressed_model():
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    momentum = Momentum(size=8)
    first = momentum.update(live)
    assert first is not live and all(not p.requires_grad for p in first.parameters())
    before = [p.clone() for p in first.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    momentum.update(live)
    for old, new, now in zip(before, live.parameters(), first.parameters()):
        torch.testing.assert_close(now, MOMENTUM * old + (1 - MOMENTUM) * new)
    narrow = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))  # "compressed"
    restarted = momentum.update(narrow)
    for p, q in zip(restarted.parameters(), narrow.parameters()):
        torch.testing.assert_close(p, q)


def test_the_momentum_copy_of_a_model_under_search_is_unmasked():
    model = build(timm_vit, (2, 8, 2, 32))
    x = images(3)
    dense = logits(model(x)).detach()
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=4, **ELEMENTWISE))
    with torch.no_grad():
        for mask in pruner.masks:
            mask.zero_()
    assert not torch.allclose(logits(model(x)), dense)  # the search model is masked
    copy = unmasked_copy(model)
    torch.testing.assert_close(logits(copy(x)), dense)
    assert not hasattr(copy, "_upop_pruner") and pruner.model is model


def _task(model_name: str, **options):
    bundle = build_bundle(model_name, "dual_encoder")
    task = get_task("retrieval", bundle, TaskOptions(momentum_distill=True, queue_size=16, **options))
    train = task.datasets(DataConfig(image_size=16, train_size=8, val_size=2, select_size=0)).train
    items = [train[i] for i in (0, 1, 5, 6)]
    batch = (torch.stack([x for x, _, _ in items]), [c for _, c, _ in items], torch.tensor([i for _, _, i in items]))
    return bundle.model.train(), task, batch


@pytest.mark.parametrize("model_name", ["blip-micro", "clip-micro"])
def test_momentum_distillation_contrasts_with_the_queue_and_mixes_soft_targets(model_name):
    torch.manual_seed(0)
    model, task, batch = _task(model_name)
    task.begin_step(1, 0, 10)  # past the ramp: alpha 0.4
    out = task.outputs(model, batch)
    assert out["i2t"].shape == out["t2i"].shape == (4, 4 + 16)
    for key in ("i2t_targets", "t2i_targets"):
        torch.testing.assert_close(out[key].sum(1), torch.ones(4))
    truth = soft_targets(batch[2], torch.cat([batch[2], torch.full((16,), -100)]))
    teacher = task.momentum.model
    with torch.no_grad():
        tokens = task.texts(model, batch[1], torch.device("cpu"))
        img_m = encode_images(teacher, batch[0])
        assert encode_texts(teacher, tokens).shape == img_m.shape
    queue = task.momentum.queued(img_m.shape[1], torch.device("cpu"))
    # the queue now holds this batch's features at slots 0-3: the momentum model's for BLIP, the model's for CLIP
    queued = img_m if model_name == "blip-micro" else encode_images(model, batch[0]).detach()
    torch.testing.assert_close(queue["image"][:4], queued, atol=1e-5, rtol=1e-4)
    assert queue["ids"][:4].tolist() == batch[2].tolist() and task.momentum.pointer == 4
    # the momentum part of the targets is the softmax of the momentum model's similarities
    soft = (out["i2t_targets"] - 0.6 * truth) / 0.4
    torch.testing.assert_close(soft.sum(1), torch.ones(4), atol=1e-5, rtol=1e-5)
    assert float(soft.min()) >= -1e-6
    task.begin_step(0, 0, 10)  # the first step of a phase: alpha 0, the ground truth alone (the queue's copies too)
    truth = soft_targets(batch[2], torch.cat([batch[2], task.momentum.queued(img_m.shape[1], img_m.device)["ids"]]))
    torch.testing.assert_close(task.outputs(model, batch)["i2t_targets"], truth)


def test_the_ramp_and_a_checkpoint_round_trip():
    torch.manual_seed(0)
    model, task, batch = _task("clip-micro")
    task.begin_step(0, 5, 10)
    assert task.alpha == pytest.approx(0.2)
    task.begin_step(2, 0, 10)
    assert task.alpha == pytest.approx(0.4)
    task.outputs(model, batch)
    with torch.no_grad():  # the model moves on: the momentum model is now not a copy of it
        for p in model.parameters():
            p.add_(0.5)
    state = task.state_dict()
    again = get_task("retrieval", task.bundle, task.options)
    again.load_state_dict(state)
    # rebuilt from the checkpoint, then moved on by this step's update, as the uninterrupted run moves it
    teacher = again.momentum.update(model)
    live = dict(model.named_parameters())
    for name, p in teacher.named_parameters():
        expected = 0.995 * state["momentum"]["model"][name] + 0.005 * live[name].detach()
        torch.testing.assert_close(p, expected, msg=name)
    assert again.momentum.pointer == 4
    torch.testing.assert_close(again.momentum.queue["image"], task.momentum.queue["image"])


def test_the_teacher_of_a_dense_distillation_sees_no_momentum():
    model, task, batch = _task("clip-micro")
    model.eval()
    out = task.outputs(model, batch)
    assert out["i2t"].shape == (4, 4) and task.momentum.model is None


def test_the_temperature_is_clamped_to_blip_s_and_clip_s_ranges():
    for name, attr, value, expected in (
        ("blip-micro", "temp", 5.0, 0.5),
        ("blip-micro", "temp", 1e-5, 0.001),
        ("clip-micro", "logit_scale", 10.0, float(torch.log(torch.tensor(100.0)))),
    ):
        model, task, batch = _task(name, clamp_temperature=True)
        with torch.no_grad():
            getattr(model, attr).fill_(value)
        task.outputs(model, batch)
        assert float(getattr(model, attr).detach()) == pytest.approx(expected, rel=1e-6)


def test_rerank_k_is_the_depth_the_evaluation_rescores(monkeypatch):
    import upop.tasks.retrieval as R

    bundle = build_bundle("blip-micro", "dual_encoder")
    task = get_task("retrieval", bundle, TaskOptions(rerank_k=3))
    data = task.datasets(DataConfig(train_size=4, val_size=5, image_size=16, select_size=0)).report
    seen = []
    real = R.blip_rerank
    monkeypatch.setattr(R, "blip_rerank", lambda *a: seen.append(a[4]) or real(*a))
    task.evaluate(bundle.model, torch.utils.data.DataLoader(data, batch_size=4), torch.device("cpu"))
    assert seen == [3]


@pytest.mark.ddp
@pytest.mark.e2e
def test_itm_hard_negatives_come_from_every_rank(tmp_path):
    worker = Path(__file__).with_name("negatives_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for flag in ("all", "own"):
        result = subprocess.run([*cmd, str(tmp_path), flag], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        every = torch.load(tmp_path / f"all{rank}.pt", weights_only=True)
        own = torch.load(tmp_path / f"own{rank}.pt", weights_only=True)
        # each rank's batch shows one image: its own negatives can only repeat it, every rank's come from the other
        assert every["negative_image_ids"].tolist() == [1 - rank] * 4
        assert every["negative_text_ids"].tolist() == [1 - rank] * 4
        assert own["negative_image_ids"].tolist() == [rank] * 4


@pytest.mark.e2e
@pytest.mark.slow
def test_a_momentum_run_killed_in_each_phase_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    """The momentum model and the queue are in the checkpoints: a resumed run continues them, so it ends with the
    weights, plan and step log of a run that never stopped (killed during the search, then during retraining)."""
    worker = Path(__file__).parents[1] / "engine" / "fault_worker.py"
    argv = "compress --task retrieval --model clip-micro --train-size 24 --val-size 8 --batch-size 8 --seed 1".split()
    argv += "--epochs-search 2 --epochs 2 --checkpoint-every 4 --momentum-distill --queue-size 40".split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, kill_at, *extra):
        cmd = [sys.executable, str(worker), str(kill_at), "0", *argv, "--output-dir", str(out), *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    reference = tmp_path / "ref"
    assert run(reference, 0).returncode == 0
    for kill_at in (6, 40):  # 30 steps per phase: in the search, in retraining
        out = tmp_path / f"killed{kill_at}"
        assert run(out, kill_at).returncode == -9
        resumed = run(out, 0, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_result(reference, out)
