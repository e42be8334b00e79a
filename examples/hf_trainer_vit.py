"""Fine-tune and prune an HF ViT with the HF Trainer: the Trainer's run is UPop's search.

    python examples/hf_trainer_vit.py --out vit-2x               # a ViT-Small-sized model from its config
    python examples/hf_trainer_vit.py --model DIR --out vit-2x   # a local HF ViT directory (nothing is downloaded)

The data here are random images whose label is their brightest colour channel: put your own dataset of
{"pixel_values", "labels"} in its place. The compressed model is saved (plan + safetensors) and reloaded with
upop.load_compressed."""

from __future__ import annotations

import argparse

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import upop
from upop.integrations.transformers import UPopCallback


class Brightest(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.labels = self.images.mean(dim=(2, 3)).argmax(1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a local HF ViT directory (default: a ViT-Small-sized config)")
    ap.add_argument("--out", required=True, help="where the compressed model is saved")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 32-wide ViT at 32 px (a quick check)")
    args = ap.parse_args()
    if args.model:
        config = ViTConfig.from_pretrained(args.model, num_labels=3)
        build = lambda: ViTForImageClassification(config)  # noqa: E731  (the architecture; weights below)
    else:
        size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)
        config = ViTConfig(
            **(size if args.tiny else dict(image_size=224)), patch_size=8 if args.tiny else 16, num_labels=3
        )
        build = lambda: ViTForImageClassification(config)  # noqa: E731
    torch.manual_seed(0)
    model = ViTForImageClassification.from_pretrained(args.model, num_labels=3) if args.model else build()
    data = Brightest(64 if args.tiny else 2048, model.config.image_size)

    training = TrainingArguments(
        output_dir=f"{args.out}-trainer",
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=1e-4,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training, train_dataset=data)
    search = UPopCallback(upop.PruneConfig(p=0.5), save_to=args.out).add_to(trainer)
    trainer.train()  # the search; at its end the model is compressed in place and saved to --out

    reloaded = upop.load_compressed(build, args.out).eval()
    x = data[0]["pixel_values"][None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, search.compressed.eval()(pixel_values=x).logits)
    params = sum(p.numel() for p in reloaded.parameters())
    print(f"saved to {args.out}: {params / 1e6:.2f}M parameters; the reloaded model computes the same outputs")


if __name__ == "__main__":
    main()
