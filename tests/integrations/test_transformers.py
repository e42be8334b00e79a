"""The HF Trainer callback: the Trainer's run is the search; it chooses what the Pruner chooses in a plain loop over
the same data, seed and steps; a run stopped and resumed from its checkpoint ends with the plan of one that was not;
its scalars reach the Trainer's logs; the compressed model it saves reloads with upop.load_compressed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import ELEMENTWISE, hf_vit, timm_vit

import upop

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from upop.integrations.transformers import UPopCallback  # noqa: E402

STEPS, BATCH = 12, 4
CONFIG = upop.PruneConfig(p=0.5, **ELEMENTWISE)


class Images(torch.utils.data.IterableDataset):
    """48 random labelled images in a fixed order (the Trainer does not shuffle an iterable data set)."""

    def __iter__(self):
        g = torch.Generator().manual_seed(3)
        for _ in range(STEPS * BATCH):
            yield {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.randint(0, 5, (), generator=g)}


def _args(out, **kw) -> TrainingArguments:
    settings = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **kw})


class TimmClassifier(torch.nn.Module):
    """A timm ViT as the Trainer calls a model: keyword inputs, a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = timm_vit(head_dim=8)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(pixel_values)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels % logits.shape[1]), "logits": logits}


def _trainer(out, *callbacks, model=hf_vit, **kw) -> tuple[Trainer, UPopCallback]:
    torch.manual_seed(0)
    trainer = Trainer(model=model(), args=_args(out, **kw), train_dataset=Images(), callbacks=list(callbacks))
    return trainer, UPopCallback(CONFIG, save_to=out / "compressed").add_to(trainer)


def _kept(plan) -> list[list[int]]:
    return [s["kept"] for s in plan.structures]


def test_the_trainer_callback_chooses_what_the_pruner_chooses_in_a_plain_loop(tmp_path):
    trainer, callback = _trainer(tmp_path)
    trainer.train()
    searched = callback.compressed._upop_plan
    torch.manual_seed(0)
    model = hf_vit()
    pruner = upop.Pruner(model, dataclasses.replace(CONFIG, total_steps=STEPS))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for batch in torch.utils.data.DataLoader(Images(), batch_size=BATCH):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    assert pruner.finished() and _kept(pruner.plan()) == _kept(searched)
    assert any(len(k) < s.size for k, s in zip(_kept(searched), pruner.structures))  # it did prune
    # the Trainer's logs carry the search's scalars; the saved model reloads and computes what the compressed one does
    logged = [h for h in trainer.state.log_history if "upop/pi" in h]
    assert [h["step"] for h in logged][:3] == [4, 8, 12] and logged[2]["upop/pi"] == pytest.approx(0.5)
    assert 0 < logged[2]["upop/kept_attn"] < 1
    # the logged cost is the pruner's; it misses p by at most half its coarsest unit (one head dim of 3 heads: 3 x 87
    # of hf_vit's 5,288 prunable parameters, about 4.9%), the granularity of the closest cut
    assert logged[2]["upop/pruned_cost"] == pytest.approx(pruner.pruned_cost_fraction())
    assert abs(logged[2]["upop/pruned_cost"] - 0.5) <= 0.5 * 3 * 87 / 5288
    reloaded = upop.load_compressed(hf_vit, tmp_path / "compressed").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, callback.compressed.eval()(x).logits)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.e2e
def test_a_trainer_run_stopped_and_resumed_from_its_checkpoint_ends_with_the_same_plan(tmp_path):
    # a timm model: transformers 5's Trainer saves an HF ViT under its legacy key names and does not map them back
    # when it resumes, so the resumed weights would be the fresh ones whatever the callback does
    saving = dict(save_strategy="steps", save_steps=6, model=TimmClassifier)
    whole, whole_cb = _trainer(tmp_path / "whole", **saving)
    whole.train()
    stopped, stopped_cb = _trainer(tmp_path / "run", StopAt(8), **saving)
    stopped.train()
    assert stopped_cb.compressed is None and (tmp_path / "run" / "checkpoint-6" / "upop_search.pt").is_file()
    resumed, resumed_cb = _trainer(tmp_path / "run", **saving)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert _kept(resumed_cb.compressed._upop_plan) == _kept(whole_cb.compressed._upop_plan)


def test_resuming_from_a_checkpoint_without_the_search_s_state_is_refused_in_one_line(tmp_path):
    args = _args(tmp_path, save_strategy="steps", save_steps=6)
    plain = Trainer(model=TimmClassifier(), args=args, train_dataset=Images())
    plain.train()
    trainer, _ = _trainer(tmp_path, save_strategy="steps", save_steps=6, model=TimmClassifier)
    with pytest.raises(upop.UPopError, match="holds no UPop search state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
