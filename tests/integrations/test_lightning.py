"""The Lightning callback: fit is the search; it chooses what the Pruner chooses in a plain loop over the same data,
seed and steps; a fit stopped and resumed from its checkpoint ends with the plan of one that was not; its scalars
reach the loggers; the compressed model it saves reloads with upop.load_compressed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import ELEMENTWISE, timm_vit

import upop

L = pytest.importorskip("lightning")
from upop.integrations.lightning import UPopCallback  # noqa: E402

STEPS, BATCH = 12, 4
CONFIG = upop.PruneConfig(p=0.5, **ELEMENTWISE)


def _loader(same_batches: bool = False) -> torch.utils.data.DataLoader:
    """12 labelled images in a fixed order, 3 steps per epoch; with ``same_batches`` every batch is the same 4."""
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 5, (12,), generator=g)
    if same_batches:
        images, labels = images[:4].repeat(3, 1, 1, 1), labels[:4].repeat(3)
    data = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = timm_vit(head_dim=8)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.model(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class Scalars(L.pytorch.loggers.logger.Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "scalars", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _fit(tmp_path, callback, *extra, ckpt_path=None, same_batches=False, **kw):
    settings = dict(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
    )
    trainer = L.Trainer(callbacks=[callback, *extra], **{**settings, **kw})
    module = Module()
    trainer.fit(module, _loader(same_batches), ckpt_path=ckpt_path)
    return trainer, module


def _kept(plan) -> list[list[int]]:
    return [s["kept"] for s in plan.structures]


def test_the_lightning_callback_chooses_what_the_pruner_chooses_in_a_plain_loop(tmp_path):
    callback = UPopCallback(CONFIG, save_to=tmp_path / "compressed")
    logger = Scalars()
    _fit(tmp_path, callback, logger=logger)
    searched = callback.compressed._upop_plan
    module = Module()
    pruner = upop.Pruner(module.model, dataclasses.replace(CONFIG, total_steps=STEPS))
    optimizer = module.configure_optimizers()
    module.train()
    for _ in range(STEPS // 3):
        for batch in _loader():
            module.training_step(batch, 0).backward()
            optimizer.step()
            optimizer.zero_grad()
            pruner.step()
    assert pruner.finished() and _kept(pruner.plan()) == _kept(searched)
    assert any(len(k) < s.size for k, s in zip(_kept(searched), pruner.structures))  # it did prune
    pis = [m["upop/pi"] for _, m in logger.rows if "upop/pi" in m]
    assert len(pis) == STEPS and pis == sorted(pis) and pis[-1] == pytest.approx(0.5)
    reloaded = upop.load_compressed(lambda: timm_vit(head_dim=8), tmp_path / "compressed").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), callback.compressed.eval()(x))


class StopAfter(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.e2e
def test_a_fit_stopped_and_resumed_from_its_checkpoint_ends_with_the_same_plan(tmp_path):
    """The checkpoint holds the search's state and the fit continues it. (Every batch is the same: which batch a
    resumed Lightning fit starts at is Lightning's business; from an epoch-end checkpoint it repeats one.)"""
    whole = UPopCallback(CONFIG)
    _fit(tmp_path / "whole", whole, same_batches=True)
    saver = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_epochs=2, save_top_k=-1, save_on_train_epoch_end=True
    )
    stopped = UPopCallback(CONFIG)
    _fit(tmp_path / "run", stopped, saver, StopAfter(8), enable_checkpointing=True, same_batches=True)
    assert stopped.compressed is None
    (checkpoint,) = [p for p in (tmp_path / "ckpt").iterdir() if "step=6" in p.name]
    resumed = UPopCallback(CONFIG)
    _fit(tmp_path / "run", resumed, ckpt_path=str(checkpoint), same_batches=True)
    assert resumed.pruner is None and resumed.compressed is not None
    assert _kept(resumed.compressed._upop_plan) == _kept(whole.compressed._upop_plan)
