"""``UPopCallback`` for the HF ``Trainer``: the Trainer's run is UPop's search.

    from upop.integrations.transformers import UPopCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    UPopCallback(upop.PruneConfig(p=0.5), save_to="vit-2x").add_to(trainer)
    trainer.train()            # searches for args.max_steps steps, then compresses and saves to vit-2x
    model = trainer.model      # the compressed model; retrain it with another Trainer, reload it with
                               # upop.load_compressed(build_dense, "vit-2x")

At train start it attaches a ``Pruner`` (its ``total_steps``: the Trainer's optimizer steps, after gradient
accumulation, unless ``total_steps`` is given); after every optimizer step it calls ``Pruner.step()`` (the mask
gradients are averaged over the Trainer's DDP ranks there); every log adds ``upop/pi``, ``upop/kept_attn``,
``upop/kept_mlp``, ``upop/pruned_cost`` (and the kept fractions per tower of a multi-tower model) to the Trainer's
own logs, so they reach whatever ``report_to`` is set (``add_to`` puts the callback first in the Trainer's list so
that every reporter sees them; one added with ``trainer.add_callback`` or ``callbacks=`` comes after the reporters the
Trainer made, which then miss them). Every checkpoint holds the search's state
(``upop_search.pt``); ``trainer.train(resume_from_checkpoint=...)`` continues the search exactly where it was. When
the search has run its steps, the model is compressed in place at train end and, with ``save_to``, saved there
(``compress_at_end=False`` leaves both to the caller: ``callback.pruner.compress()``).

The masks get their gradients from the Trainer's own loss; nothing is added to it. With fp16 mixed precision the
mask gradients carry the loss scale; use bf16 or fp32 for the search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from upop.core.config import PruneConfig
from upop.integrations._search import Search


class UPopCallback(TrainerCallback):
    """UPop's search during a ``transformers.Trainer`` run (see the module docstring).

    Args:
        config: the search (``p``, ranking, granularity...); its ``total_steps`` is replaced by ``total_steps``.
        total_steps: search steps (optimizer steps); None: the Trainer's ``max_steps`` (the whole run).
        compress_at_end: compress the model in place when training ends after the search's last step.
        save_to: where the compressed model is saved (plan.json + model.safetensors); None: not saved.
        example_inputs: a batch as the model takes it (for ``cost="flops"``/``"latency"``).
    """

    def __init__(
        self,
        config: PruneConfig | None = None,
        total_steps: int | None = None,
        compress_at_end: bool = True,
        save_to: str | Path | None = None,
        example_inputs: Any = None,
    ) -> None:
        self.search = Search(config, example_inputs)
        self.total_steps, self.compress_at_end, self.save_to = total_steps, compress_at_end, save_to
        self.compressed = None

    def add_to(self, trainer: Any) -> UPopCallback:
        """Put this callback first in ``trainer``'s callbacks (before its reporters); returns it."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    @property
    def pruner(self) -> Any:
        return self.search.pruner

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0 and self.search.pruner is None and self.search.pending is None:
            self.search.load(Path(args.output_dir) / f"checkpoint-{state.global_step}")  # a resumed run
        self.search.start(model, self.total_steps or state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.search.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        scalars = self.search.scalars()
        if logs is not None:
            logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)  # the Trainer's copy (trainer_state.json) too

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.search.pruner is not None:
            self.search.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.compress_at_end:
            self.compressed = self.search.finish(self.save_to, save=state.is_world_process_zero)
