"""``python generative_ddp_worker.py OUT`` alone or under torchrun: caption and VQA metrics of blip-micro (seeded
random weights, trained for a few steps so answers differ) on a built-in report split of 10 samples, evaluated with
the sharded loaders every job uses; saves them to OUT/metrics<world size>.json."""

from __future__ import annotations

import json
import sys

import torch

from upop.data.config import DataConfig
from upop.engine.loaders import make_loaders
from upop.models import build
from upop.tasks import get_task
from upop.utils import dist as D


def main(out: str) -> None:
    info = D.setup("cpu")
    torch.set_num_threads(1)
    metrics = {}
    for name, kind in (("caption", "captioner"), ("vqa", "vqa")):
        torch.manual_seed(0)
        bundle = build("blip-micro", kind)
        model = bundle.model
        task = get_task(name, bundle)
        splits = task.datasets(DataConfig(image_size=16, train_size=16, val_size=10, select_size=0))
        loaders = make_loaders(splits, 4, info, 0)  # 10 samples: ranks get 5 and 5, in batches of 4 and 1
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        batch = next(
            iter(torch.utils.data.DataLoader(splits.train, 16, collate_fn=getattr(splits.train, "collate", None)))
        )
        for _ in range(5):  # the same steps on every rank, no DDP: identical weights
            opt.zero_grad()
            task.loss(model, batch).backward()
            opt.step()
        metrics[name] = task.evaluate(model, loaders.report, info.device)
    if info.is_main:
        with open(f"{out}/metrics{info.world_size}.json", "w") as f:
            json.dump(metrics, f)
    D.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
