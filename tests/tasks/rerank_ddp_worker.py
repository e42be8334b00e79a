"""``torchrun --nproc_per_node=N rerank_ddp_worker.py OUT``: BLIP retrieval's rerank evaluation of blip-micro on the
built-in report split (7 images, 35 captions), each rank rescoring its share of the queries; saves the two score
matrices every rank ends with to OUT/rerank<world>-<rank>.pt."""

from __future__ import annotations

import sys

import torch

from upop.data.config import DataConfig
from upop.models import build
from upop.tasks import get_task
from upop.tasks.retrieval import blip_rerank, encode_images, encode_texts
from upop.utils import dist as D


def main(out: str) -> None:
    info = D.setup("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bundle = build("blip-micro", "dual_encoder")
    task = get_task("retrieval", bundle)
    data = task.datasets(DataConfig(train_size=8, val_size=7, image_size=16, select_size=0)).report
    model = bundle.model.eval()
    with torch.no_grad():
        img = encode_images(model, torch.stack([data[i] for i in range(len(data))]))
        tokens = task.tokenize(data.captions, torch.device("cpu"))
        sims = img @ encode_texts(model, tokens).T
        i2t, t2i = blip_rerank(model, data, tokens, sims, k=3, batch=4)
    torch.save({"i2t": i2t, "t2i": t2i}, f"{out}/rerank{info.world_size}-{info.rank}.pt")
    D.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
