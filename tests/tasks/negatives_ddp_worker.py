"""``torchrun --nproc_per_node=2 negatives_ddp_worker.py OUT all|own``: BLIP retrieval's ITM on blip-micro where each
rank's batch shows a single image (image id = the rank) with captions of another length on each rank; saves, per
rank, the image id (= the rank it came from) of every hard negative image and text to OUT/<all|own><rank>.pt."""

from __future__ import annotations

import sys

import torch

from upop.models import build
from upop.utils import dist as D


def _owner(rows: torch.Tensor, pool: torch.Tensor) -> list[int]:
    """For each row, the rank (4 rows each) of the pool row it equals."""
    flat_rows, flat_pool = rows.flatten(1).float(), pool.flatten(1).float()
    return [int(torch.cdist(r[None], flat_pool).argmin()) // 4 for r in flat_rows]


def main(out: str, mode: str) -> None:
    info = D.setup("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build("blip-micro", "dual_encoder").model.train()
    torch.manual_seed(1 + info.rank)
    images = torch.randn(1, 3, 16, 16).expand(4, -1, -1, -1) + 0.01 * torch.randn(4, 3, 16, 16)
    length = 5 + 3 * info.rank
    ids = torch.randint(5, 40, (4, length))
    seen = []
    itm = model.itm
    model.itm = lambda i, m, e: seen.append((i, e)) or itm(i, m, e)
    model(images, ids, torch.ones_like(ids), image_ids=torch.full((4,), info.rank), negatives_all_ranks=mode == "all")
    texts, embeds = seen[0]
    with torch.no_grad():
        every_embeds = D.gather(model.image_embeds(images))
        longest = int(D.gather(torch.tensor([length])).max())
        every_ids = D.gather(torch.nn.functional.pad(ids, (0, longest - length)))
    result = {
        "negative_image_ids": torch.tensor(_owner(embeds[8:], every_embeds)),
        "negative_text_ids": torch.tensor(
            _owner(torch.nn.functional.pad(texts[4:8], (0, longest - texts.shape[1])), every_ids)
        ),
    }
    torch.save(result, f"{out}/{mode}{info.rank}.pt")
    seen.clear()  # the ITM inputs hold the forward's graph, and through its gather the process group
    D.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
