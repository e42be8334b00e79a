"""Prune a timm ViT inside a PyTorch Lightning fit: the fit is UPop's search.

    python examples/lightning_timm.py --out deit-2x                         # DeiT-Small from its config
    python examples/lightning_timm.py --arch vit_base_patch16_224 --out b2x  # any timm ViT (random weights here;
                                                                            # load yours with timm's checkpoint_path)

The data here are random images whose label is their brightest colour channel: use your own loader. The compressed
model is saved (plan + safetensors) and reloaded with upop.load_compressed."""

from __future__ import annotations

import argparse

import lightning as L
import timm
import torch

import upop
from upop.integrations.lightning import UPopCallback


class Classifier(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model  # the callback prunes pl_module.model

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = torch.nn.functional.cross_entropy(self.model(images), labels)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="deit_small_patch16_224")
    ap.add_argument("--out", required=True, help="where the compressed model is saved")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 32-wide ViT at 32 px (a quick check)")
    args = ap.parse_args()
    size = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2) if args.tiny else {}
    build = lambda: timm.create_model(args.arch, num_classes=3, **size)  # noqa: E731
    torch.manual_seed(0)
    model = build()
    side = model.patch_embed.img_size[0]
    images = torch.rand(64 if args.tiny else 2048, 3, side, side, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(images, images.mean(dim=(2, 3)).argmax(1))

    search = UPopCallback(upop.PruneConfig(p=0.5), save_to=args.out)
    trainer = L.Trainer(max_steps=args.steps, callbacks=[search], logger=False, enable_checkpointing=False)
    trainer.fit(Classifier(model), torch.utils.data.DataLoader(data, batch_size=16, shuffle=True))

    reloaded = upop.load_compressed(build, args.out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images[:2]), search.compressed.eval()(images[:2]))
    params = sum(p.numel() for p in reloaded.parameters())
    print(f"saved to {args.out}: {params / 1e6:.2f}M parameters; the reloaded model computes the same outputs")


if __name__ == "__main__":
    main()
