"""``python retrieval_ddp_worker.py OUT`` alone or under torchrun: the contrastive loss of clip-micro on one fixed
global batch of 8 pairs (images repeated: ids 0 0 1 2 2 3 4 1), each rank taking its contiguous share; saves the
DDP-averaged gradients to OUT/grads<world size>.pt."""

from __future__ import annotations

import sys

import torch

from upop.data.config import DataConfig
from upop.models import build
from upop.tasks import get_task
from upop.utils import dist as D

PAIRS = [0, 1, 5, 10, 11, 15, 20, 6]  # 5 captions per scene: pair i belongs to image i // 5


def main(out: str) -> None:
    info = D.setup("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bundle = build("clip-micro", "dual_encoder")
    task = get_task("retrieval", bundle)
    train = task.datasets(DataConfig(image_size=16, train_size=8, val_size=2, select_size=0)).train
    items = [train[i] for i in PAIRS]
    share = len(PAIRS) // info.world_size
    mine = items[info.rank * share : (info.rank + 1) * share]
    batch = (torch.stack([x for x, _, _ in mine]), [c for _, c, _ in mine], torch.tensor([i for _, _, i in mine]))
    model = bundle.model
    ddp = D.wrap(model, info)
    loss = task.loss(ddp, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if info.is_main:
        torch.save({"grads": grads, "ids": batch[2]}, f"{out}/grads{info.world_size}.pt")
    D.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
