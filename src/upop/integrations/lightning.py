"""``UPopCallback`` for PyTorch Lightning: the ``Trainer.fit`` run is UPop's search.

    from upop.integrations.lightning import UPopCallback

    search = UPopCallback(upop.PruneConfig(p=0.5), save_to="vit-2x")
    trainer = lightning.Trainer(max_steps=3000, callbacks=[search])
    trainer.fit(module, train_loader)   # searches for max_steps steps, then compresses and saves to vit-2x
    compressed = search.compressed      # reload later with upop.load_compressed(build_dense, "vit-2x")

At fit start it attaches a ``Pruner`` to ``pl_module.model`` (or to the module itself when it has no ``model``
attribute; ``attribute=`` names another), for ``total_steps`` optimizer steps (default: the Trainer's
``max_steps``, or its ``estimated_stepping_batches``). After every optimizer step (``on_train_batch_end`` once
``global_step`` has moved: gradient accumulation counts one step) it calls ``Pruner.step()``, and logs ``upop/pi``,
the kept fractions and the pruned share of the cost through ``pl_module.log``, so they reach the Trainer's loggers.
Its ``state_dict`` is the search's, so a Lightning checkpoint holds it and ``fit(ckpt_path=...)`` continues the
search exactly. When the search has run its steps, the model is compressed in place at fit end and, with
``save_to``, saved there (``compress_at_end=False`` leaves that to the caller)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from upop.core.config import PruneConfig
from upop.integrations._search import Search


class UPopCallback(Callback):
    """UPop's search during a Lightning ``fit`` (see the module docstring).

    Args:
        config: the search (``p``, ranking, granularity...); its ``total_steps`` is replaced by ``total_steps``.
        total_steps: search steps (optimizer steps); None: the Trainer's ``max_steps`` or estimated steps.
        attribute: the attribute of the LightningModule that holds the model to prune (None: ``model`` if present,
            else the module itself).
        compress_at_end: compress the model in place when fit ends after the search's last step.
        save_to: where the compressed model is saved (plan.json + model.safetensors); None: not saved.
        example_inputs: a batch as the model takes it (for ``cost="flops"``/``"latency"``).
    """

    def __init__(
        self,
        config: PruneConfig | None = None,
        total_steps: int | None = None,
        attribute: str | None = None,
        compress_at_end: bool = True,
        save_to: str | Path | None = None,
        example_inputs: Any = None,
    ) -> None:
        self.search = Search(config, example_inputs)
        self.total_steps, self.attribute = total_steps, attribute
        self.compress_at_end, self.save_to = compress_at_end, save_to
        self.compressed = None
        self._seen_step = 0

    @property
    def pruner(self) -> Any:
        return self.search.pruner

    def _model(self, pl_module: Any) -> Any:
        if self.attribute is not None:
            return getattr(pl_module, self.attribute)
        return getattr(pl_module, "model", pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        steps = self.total_steps or (trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)
        self.search.start(self._model(pl_module), int(steps))

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen_step = trainer.global_step  # (restored by now when resuming)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._seen_step:
            return  # an accumulation micro-batch: no optimizer step yet
        self._seen_step = trainer.global_step
        self.search.step()
        for key, value in self.search.scalars().items():
            pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        return self.search.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.search.load_state_dict(state_dict)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.compress_at_end:
            self.compressed = self.search.finish(self.save_to, save=trainer.is_global_zero)
