"""Checkpoint files: atomic against a writer that dies mid-checkpoint or a full disk, verified on load (a truncated
or corrupt checkpoint falls back to the previous one), and non-finite steps (NaN injected into a batch) neither
move the weights nor touch the accumulated importance."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from helpers import CLI_DATA
from torch.utils.data import Dataset

from upop import Pruner
from upop.cli import main
from upop.core.config import PruneConfig
from upop.data.config import DataConfig
from upop.data.splits import Splits
from upop.engine import checkpoint as C
from upop.engine.loaders import make_loaders
from upop.engine.loop import Phase, run_phase
from upop.errors import UPopError
from upop.models import build_model
from upop.tasks import get_task
from upop.utils import dist as D

INFO = D.DistInfo(0, 1, 0, torch.device("cpu"))


def _snap(step: int, value: float) -> C.Snapshot:
    weights = {"w": torch.full((4, 3), value), "b": torch.arange(3.0) * value}
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(2) * value}}, "param_groups": [{"lr": 0.1}]}}
    return C.Snapshot((1, step), "search", weights, state, {"loop": {"step": step}})


def _quiet(messages: list[str]):
    return lambda msg: messages.append(msg)


def test_round_trip_restores_weights_state_and_rng(tmp_path):
    ck = C.Checkpointer(tmp_path, INFO, say=_quiet([]))
    torch.manual_seed(5)
    snap = _snap(3, 2.0)
    expected_draw = torch.rand(3)
    ck.save(snap)
    got = ck.latest()
    assert got.key == (1, 3) and got.meta["loop"] == {"step": 3}
    assert torch.equal(got.weights["w"], snap.weights["w"]) and torch.equal(got.weights["b"], snap.weights["b"])
    assert torch.equal(got.state["optimizer"]["state"][0]["exp_avg"], torch.full((2,), 2.0))
    C.set_rng_state(got.rng)
    assert torch.equal(torch.rand(3), expected_draw)


def test_only_the_newest_keep_checkpoints_remain(tmp_path):
    ck = C.Checkpointer(tmp_path, INFO, keep=2, say=_quiet([]))
    for step in (3, 6, 9):
        ck.save(_snap(step, float(step)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1-search-000000006", "1-search-000000009"]


@pytest.mark.parametrize("fail_at", [1, 3, 5])  # the RNG file, a weights file, the manifest
def test_a_writer_dying_mid_checkpoint_leaves_the_previous_one_loadable(tmp_path, fail_at):
    messages: list[str] = []
    C.Checkpointer(tmp_path, INFO, say=_quiet(messages)).save(_snap(3, 1.0))
    calls = 0

    def dying_writer(path: Path, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            path.write_bytes(data[: len(data) // 2])  # half a file, then the "crash"
            raise OSError(errno.ENOSPC, "No space left on device")
        C.write_file(path, data)

    with pytest.raises(UPopError, match="No space left on device.*earlier checkpoints are intact"):
        C.Checkpointer(tmp_path, INFO, write=dying_writer, say=_quiet(messages)).save(_snap(6, 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["1-search-000000003"]  # no temporary left behind
    got = C.Checkpointer(tmp_path, INFO, say=_quiet(messages)).latest()
    assert got.key == (1, 3) and torch.equal(got.weights["w"], torch.full((4, 3), 1.0))
    assert messages == [f"resuming from {tmp_path / '1-search-000000003'}"]


def test_a_kill_before_the_rename_leaves_an_unlisted_temporary(tmp_path):
    ck = C.Checkpointer(tmp_path, INFO, say=_quiet([]))
    ck.save(_snap(3, 1.0))
    (tmp_path / ".tmp-1-search-000000006").mkdir()  # what a SIGKILL during the writes leaves
    (tmp_path / ".tmp-1-search-000000006" / "model.safetensors").write_bytes(b"\0" * 10)
    assert ck.latest().key == (1, 3)
    ck.save(_snap(6, 2.0))  # the stale temporary is replaced
    assert ck.latest().key == (1, 6)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-7]), "truncated"),
        (lambda d: (d / "state.pt").write_bytes(b"x" + (d / "state.pt").read_bytes()[1:]), "checksum"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest"),
    ],
)
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, damage, why):
    messages: list[str] = []
    ck = C.Checkpointer(tmp_path, INFO, say=_quiet(messages))
    ck.save(_snap(3, 1.0))
    ck.save(_snap(6, 2.0))
    damage(tmp_path / "1-search-000000006")
    got = ck.latest()
    assert got.key == (1, 3)
    assert why in messages[0] and "1-search-000000006 is unusable" in messages[0]
    assert "trying an older one" in messages[0]


def test_no_usable_checkpoint_starts_afresh(tmp_path):
    messages: list[str] = []
    ck = C.Checkpointer(tmp_path, INFO, say=_quiet(messages))
    ck.save(_snap(3, 1.0))
    (tmp_path / "1-search-000000003" / "meta.json").write_text("{}")
    assert ck.latest() is None
    assert messages[-1] == "no usable checkpoint; starting from the beginning"


class _Poisoned(Dataset):
    """A dataset whose samples ``bad`` are NaN images."""

    def __init__(self, base: Dataset, bad: set[int]) -> None:
        self.base, self.bad, self.classes = base, bad, base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return (torch.full_like(x, float("nan")) if i in self.bad else x), y


def _search_setup(bad: set[int] | None = None, all_bad: bool = False):
    task = get_task("classification")
    splits = task.datasets(DataConfig(image_size=16, train_size=128, val_size=32))
    bad = set(range(len(splits.train))) if all_bad else (bad or set())
    poisoned = Splits(_Poisoned(splits.train, bad), splits.select, splits.report)
    loaders = make_loaders(poisoned, 16, INFO, seed=0)
    torch.manual_seed(0)
    model = build_model("vit-micro", task.num_outputs(DataConfig()))
    pruner = Pruner(model, PruneConfig(p=0.5, total_steps=len(loaders.train)))
    return task, loaders, model, pruner


def test_a_nan_batch_is_skipped_counted_and_leaves_weights_alone():
    task, loaders, model, pruner = _search_setup()
    # the sample indices of step 1 (same order every run; the sampler yields (epoch, index) keys)
    first_batch = [index for _, index in next(iter(loaders.train.batch_sampler))]
    _, loaders_bad, model_bad, pruner_bad = _search_setup(bad={first_batch[0]})
    phase = Phase("search", 1, 1e-3, max_nonfinite=0.5)
    clean = run_phase(model, task, loaders, INFO, phase, pruner=pruner)
    bad = run_phase(model_bad, task, loaders_bad, INFO, phase, pruner=pruner_bad)
    assert clean["nonfinite_steps"] == 0 and pruner.skipped_steps == 0
    assert bad["nonfinite_steps"] == 1 and pruner_bad.skipped_steps == 1
    assert pruner_bad.step_count == pruner.step_count == len(loaders.train)  # the schedule still advanced
    assert all(torch.isfinite(p).all() for p in model_bad.parameters())
    assert all(torch.isfinite(a).all() for a in pruner_bad.importance)
    assert set(torch.cat(pruner_bad.masks).unique().tolist()) <= {0.0, 1.0}  # the search still completed


def test_a_nan_step_does_not_touch_the_accumulated_importance():
    task, loaders, model, pruner = _search_setup()
    images, labels = next(iter(loaders.train))
    for x in (images, torch.full_like(images, float("nan"))):
        before = [a.clone() for a in pruner.importance]
        (task.loss(model, (x, labels)) + pruner.sparsity_loss()).backward()
        pruner.step()
    assert pruner.skipped_steps == 1 and pruner.step_count == 2
    assert any(b.abs().sum() > 0 for b in before)  # the good step did accumulate
    assert all(torch.equal(a, b) for a, b in zip(pruner.importance, before))  # the NaN step did not


def test_too_many_nonfinite_steps_stop_the_run_with_a_clear_message():
    task, loaders, model, pruner = _search_setup(all_bad=True)
    with pytest.raises(UPopError, match=r"search: 1 of 1 steps had non-finite loss or gradients.*0\.1"):
        run_phase(model, task, loaders, INFO, Phase("search", 1, 1e-3), pruner=pruner)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.e2e
def test_disk_full_during_a_run_is_one_line_and_resume_then_finishes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = [
        "compress",
        *CLI_DATA,
        *"--epochs-search 1 --epochs 1 --checkpoint-every 2".split(),
        "--output-dir",
        str(out),
    ]
    writes = 0
    real = C.write_file

    def filling_disk(path: Path, data: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes > 12:  # two checkpoints (5 files each) fit, the third does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(C, "write_file", filling_disk)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("upop: error: cannot write a checkpoint in")
    assert "No space left on device" in err[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0-search-000000002", "0-search-000000004"]
    monkeypatch.setattr(C, "write_file", real)
    assert main([*argv, "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert (out / "report.json").is_file() and (out / "plan.json").is_file()


def test_unwritable_output_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = ["train", *CLI_DATA, "--epochs", "1", "--output-dir", str(blocker / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"upop: error: cannot write the output directory {blocker / 'run'}")


def test_fp16_scaler_step_with_inf_gradients_is_not_taken():
    from upop.engine.loop import backward_and_step

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.ones(3, 4)
    x[0, 0] = float("inf")
    scale, taken = backward_and_step(layer(x).sum(), optimizer, scaler)
    assert scale == 2.0**16 and not taken
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
    scale, taken = backward_and_step(layer(torch.ones(3, 4)).sum(), optimizer, scaler)
    assert scale == 2.0**15 and taken  # the scaler backed off, then the step went through
    assert not all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
