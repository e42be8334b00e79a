"""Prune an open_clip model in your own training loop: two calls to the Pruner.

    python examples/plain_loop_open_clip.py --out clip-2x          # ViT-B-16 from open_clip's config
    python examples/plain_loop_open_clip.py --tiny --out clip-2x   # a tiny config (a quick check)

Both towers are searched in one budget. The data here are random images and random captions, matched by index: use
your own image-text pairs (and open_clip's tokenizer). The compressed model is saved and reloaded with
upop.load_compressed."""

from __future__ import annotations

import argparse

import open_clip
import torch
import torch.nn.functional as F

import upop


def clip_loss(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    image, text = F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(texts), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--out", required=True, help="where the compressed model is saved")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 32-wide CLIP at 32 px (a quick check)")
    args = ap.parse_args()
    if args.tiny:
        vision = open_clip.model.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32)
        text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=2)
        build = lambda: open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)  # noqa: E731
    else:
        build = lambda: open_clip.create_model(args.arch, pretrained=None)  # noqa: E731  (nothing downloaded)
    torch.manual_seed(0)
    model = build()
    side, length = model.visual.image_size[0], model.context_length
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, side, side, generator=g)
    texts = torch.randint(1, model.vocab_size, (64, length), generator=g)

    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=args.steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(args.steps):
        batch = torch.randint(0, 64, (16,), generator=g)
        clip_loss(model, images[batch], texts[batch]).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()  # after every optimizer step: accumulate, re-rank, move the masks along the schedule
    compressed = pruner.compress()
    upop.save_compressed(compressed, args.out)

    reloaded = upop.load_compressed(build, args.out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images[:2]), compressed.eval().encode_image(images[:2]))
    params = sum(p.numel() for p in reloaded.parameters())
    print(f"saved to {args.out}: {params / 1e6:.2f}M parameters; the reloaded model computes the same outputs")


if __name__ == "__main__":
    main()
