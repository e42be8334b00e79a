"""Run under torchrun: a search through the real engine with DDP; each rank saves every mask update it made."""

from __future__ import annotations

import sys

import torch

from upop import Pruner
from upop.core.config import PruneConfig
from upop.data.config import DataConfig
from upop.engine.loaders import make_loaders
from upop.engine.loop import Phase, run_phase
from upop.models import build_model
from upop.tasks import get_task
from upop.utils import dist as D


def main(out_dir: str) -> None:
    info = D.setup("cpu")
    torch.set_num_threads(1)
    task = get_task("classification")
    splits = task.datasets(DataConfig(image_size=16, train_size=256, val_size=64))
    loaders = make_loaders(splits, 16, info, seed=0)
    torch.manual_seed(0)
    model = build_model("vit-micro", task.num_outputs(DataConfig()))
    pruner = Pruner(model, PruneConfig(p=0.5, total_steps=len(loaders.train)))
    updates = []
    update = pruner.update_masks

    def recording_update() -> None:
        update()
        updates.append(torch.cat([m.detach().clone() for m in pruner.masks]))

    pruner.update_masks = recording_update
    run_phase(D.wrap(model, info), task, loaders, info, Phase("search", 1, 1e-3), pruner=pruner)
    torch.save(
        {
            "masks": torch.stack(updates),
            "importance": torch.cat(pruner.importance),
            "kept": [torch.tensor(s["kept"]) for s in pruner.plan().structures],
            "weights": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        },
        f"{out_dir}/rank{info.rank}.pt",
    )
    D.teardown()


def one_step_importance(out_dir: str) -> None:
    """One search step on a fixed batch of 16, each rank taking its share: the accumulated importance must not depend
    on the number of ranks (mask gradients are averaged, the L1 weights mean the same)."""
    info = D.setup("cpu")
    torch.manual_seed(0)
    model = build_model("vit-micro", 5)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 5
    shard = slice(info.rank, None, info.world_size)
    pruner = Pruner(model, PruneConfig(p=0.5, total_steps=10))
    ddp = D.wrap(model, info)
    loss = torch.nn.functional.cross_entropy(ddp(x[shard]), y[shard]) + pruner.sparsity_loss()
    loss.backward()
    pruner.step()
    torch.save({"importance": torch.cat(pruner.importance)}, f"{out_dir}/importance{info.world_size}_{info.rank}.pt")
    D.teardown()


if __name__ == "__main__":
    (one_step_importance if len(sys.argv) > 2 and sys.argv[2] == "importance" else main)(sys.argv[1])
