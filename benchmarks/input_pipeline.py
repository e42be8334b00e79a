"""Can the input pipeline feed a GPU? (`python benchmarks/input_pipeline.py`, about 3 minutes on 2 cores.)

On synthetic folders of JPEGs at the real data sets' typical sizes (ImageNet 500x375, COCO 640x480, ADE20K 683x512
with PNG label maps), each task's own training and evaluation pipelines, through the project's own loaders
(``upop.engine.loaders.make_loaders``: keyed augmentation, worker processes), are timed with 0, 1 and 2 workers
on this machine. Decoding alone is timed with PIL, PIL's ``draft`` (DCT-domain downscaling) and torchvision's
``decode_jpeg``, on one core.

BLIP's retrieval evaluation reranks the top 256 candidates of every query by ITM: on COCO's 5k test images and 25k
captions, 7.68M image-caption pairs. ITM is timed at BLIP-base width (a 12-layer 768-wide text encoder with
cross-attention to 577 image tokens at 384 px, 35-token captions) on this CPU, per 1,000 pairs, and projected to an
H200 from its FLOPs and the rate the H200 trained BLIP-base NLVR2 at (``gpu_blip.json``).

From the images per second of one worker and the search-step rates an H200 reached (``results/gpu.json`` and
``gpu_blip.json``: DeiT-S, DeiT-B and CLIP-B/16 at 224 px in bf16, BLIP NLVR2 at 384 px), it projects the workers per
GPU each run needs. Writes benchmarks/results/input_pipeline.md and .json.

With ``--device cuda`` it also times an end-to-end search epoch against the pure GPU step time
(``--e2e-model``, default DeiT-B/16, bf16 autocast, batch 256, ``--workers auto``): the loader on the ImageNet-size
folder feeding the GPU, then the same number of steps on one batch kept on the GPU; the ratio is the input
pipeline's cost (target: at most 1.2x).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from upop.data.config import DataConfig
from upop.data.images import image_reader
from upop.engine.loaders import make_loaders
from upop.tasks import get_task
from upop.utils.dist import DistInfo

HERE = Path(__file__).parent
RESULTS = HERE / "results"
CPU = DistInfo(0, 1, 0, torch.device("cpu"))
SIZES = {"imagenet": (500, 375), "coco": (640, 480), "ade20k": (683, 512)}
WORKERS = (0, 1, 2)
BATCH = 16


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like image (smooth colour fields with texture and edges), so JPEG sizes and decode times are those of
    real photos rather than of noise or flat colour."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
        channels.append(127 + 80 * np.sin(fx * x + phase) * np.cos(fy * y) + rng.normal(0, 12, (h, w)))
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def make_folders(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    w, h = SIZES["imagenet"]
    for split, count in (("train", n), ("val", n)):
        for c in range(4):
            (root / "imagenet" / split / f"class{c}").mkdir(parents=True)
        for i in range(count):
            photo(rng, w, h).save(root / "imagenet" / split / f"class{i % 4}" / f"{i}.jpg", quality=90)
    w, h = SIZES["coco"]
    (root / "coco").mkdir()
    for i in range(n):
        photo(rng, w, h).save(root / "coco" / f"{i}.jpg", quality=90)
    w, h = SIZES["ade20k"]
    for split in ("training", "validation"):
        (root / "ade20k" / "images" / split).mkdir(parents=True)
        (root / "ade20k" / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            photo(rng, w, h).save(root / "ade20k" / "images" / split / f"{i}.jpg", quality=90)
            labels = (np.arange(h)[:, None] * 7 // h * 20 + np.arange(w)[None] * 5 // w + 1).astype(np.uint8)
            Image.fromarray(labels, mode="L").save(root / "ade20k" / "annotations" / split / f"{i}.png")


class Reader(torch.utils.data.Dataset):
    """BLIP's image pipeline (``upop.data.images.image_reader``: the image-text tasks' reader) over a folder."""

    def __init__(self, root: Path, size: int, augment: str) -> None:
        self.paths = sorted(p.name for p in root.glob("*.jpg"))
        self.load = image_reader(root, self.paths, size, augment)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.load(i)


def pipelines(root: Path) -> dict[str, tuple[torch.utils.data.Dataset, str]]:
    """{name: (dataset, what it is)}: each task's training and evaluation datasets over the folders."""
    out = {}
    for augment in ("light", "deit"):
        task = get_task("classification")
        data = DataConfig(root=str(root / "imagenet"), image_size=224, augment=augment, select_size=0)
        splits = task.datasets(data)
        out[f"classification train ({augment})"] = (splits.train, "ImageNet 500x375 -> 224")
    out["classification eval"] = (splits.report, "ImageNet 500x375 -> resize 256, crop 224")
    out["BLIP train (blip)"] = (Reader(root / "coco", 384, "blip"), "COCO 640x480 -> 384")
    out["BLIP eval"] = (Reader(root / "coco", 384, "none"), "COCO 640x480 -> 384")
    task = get_task("segmentation")
    data = DataConfig(root=str(root / "ade20k"), image_size=512, augment="segmenter", select_size=0)
    splits = task.datasets(data)
    out["segmentation train (segmenter)"] = (splits.train, "ADE20K 683x512 + labels -> 512 crops")
    return out


def throughput(dataset: torch.utils.data.Dataset, workers: int) -> float:
    """Images per second through the project's training loader (keyed samples) with ``workers`` processes, timed
    from the first batch on (worker start-up excluded) over two epochs."""
    from upop.data.splits import Splits

    loader = make_loaders(Splits(dataset, None, dataset, {}), BATCH, CPU, seed=0, workers=workers).train
    seen, start = 0, None
    for epoch in range(2):
        loader.sampler.set_position(epoch, 0)
        for batch in loader:
            first = batch[0] if isinstance(batch, (list, tuple)) else batch
            if start is None:
                start = time.perf_counter()
                continue
            seen += len(first)
    return seen / (time.perf_counter() - start)


def decode_rates(folder: Path, target: int) -> dict[str, float]:
    """Images per second decoding ``folder``'s JPEGs to RGB on one core: PIL, PIL drafting to the smallest DCT scale
    whose shorter side is still >= ``target`` / 0.875 (exact for the evaluation resize; none applies when the image
    is not twice that), and torchvision's ``decode_jpeg``."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    paths = sorted(folder.rglob("*.jpg"))[:64]
    need = math.ceil(target / 0.875)

    def pil(path: Path) -> None:
        with Image.open(path) as im:
            im.convert("RGB")

    def drafted(path: Path) -> None:
        with Image.open(path) as im:
            im.draft("RGB", (need, need))
            im.convert("RGB")

    def torchvision(path: Path) -> None:
        decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)

    rates = {}
    for name, fn in (("PIL", pil), ("PIL draft", drafted), ("torchvision decode_jpeg", torchvision)):
        for p in paths[:4]:
            fn(p)
        start = time.perf_counter()
        for p in paths:
            fn(p)
        rates[name] = len(paths) / (time.perf_counter() - start)
    return rates


COCO_PAIRS = (5000 + 25000) * 256  # every image's and every caption's top 256, rescored


def rerank_cost() -> dict:
    """Seconds per 1,000 ITM pairs at BLIP-base width on this CPU (all its cores), the FLOPs of a pair, and COCO's
    whole rerank projected on this CPU and on the H200 of ``gpu_blip.json``."""
    import sys

    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(HERE))
    from gpu_check import _blip_configs

    from upop.models.blip.modeling import BlipRetrieval

    torch.set_num_threads(os.cpu_count() or 1)
    vision, text = _blip_configs("base", 30524)
    model = BlipRetrieval(vision, text, 256, 30523).eval()
    pairs = 64
    embeds = torch.randn(pairs, (384 // 16) ** 2 + 1, 768)
    ids = torch.randint(1000, 30000, (pairs, 35))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.itm(ids[:4], mask[:4], embeds[:4])
        flops = counter.get_total_flops() / 4
        model.itm(ids, mask, embeds)  # warm-up
        start = time.perf_counter()
        model.itm(ids, mask, embeds)
        per_pair = (time.perf_counter() - start) / pairs
    torch.set_num_threads(1)
    out = {"cpu_s_per_1000_pairs": 1000 * per_pair, "gflops_per_pair": flops / 1e9, "coco_pairs": COCO_PAIRS}
    out["coco_cpu_hours"] = COCO_PAIRS * per_pair / 3600
    path = RESULTS / "gpu_blip.json"
    if path.is_file():
        result = json.loads(path.read_text())
        m = next(m for m in result["models"] if m["model"] == "blip-nlvr:base")
        rate = 3 * m["gflops_per_sample"]["device"] * 1e9 * m["batch"] / m["step_s"]["search"]  # fwd + bwd
        out["gpu"] = {"device": result["device"], "tflops_per_s": rate / 1e12}
        out["gpu"]["coco_minutes"] = COCO_PAIRS * flops / rate / 60
    return out


def gpu_rates() -> dict[str, dict]:
    """Images per second one H200 consumed in a search step (batch / step time), from the GPU benchmark files."""
    rates = {}
    for name in ("gpu.json", "gpu_blip.json"):
        path = RESULTS / name
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        for m in result["models"]:
            images_per_sample = 2 if m["model"].startswith("blip-nlvr") else 1
            rates[m["model"]] = {
                "device": result["device"],
                "images_per_s": images_per_sample * m["batch"] / m["step_s"]["search"],
            }
    return rates


FEEDS = {  # GPU run -> the pipeline that feeds it
    "timm:deit_small_patch16_224": "classification train (deit)",
    "timm:deit_base_patch16_224": "classification train (deit)",
    "hf-clip:B16": "classification train (light)",
    "blip-nlvr:base": "BLIP train (blip)",
}


def end_to_end(root: Path, device: torch.device, arch: str, batch: int, steps: int) -> dict:
    """Seconds per search step of ``arch`` (timm, random weights, a Pruner attached, bf16 autocast on a GPU) fed by
    the project's loader with ``--workers auto`` from the ImageNet-size folder (DeiT augmentation), and fed one batch
    kept on the device; their ratio."""
    import timm

    import upop
    from upop.data.splits import Splits
    from upop.engine.loaders import resolve_workers
    from upop.engine.loop import to_device

    info = DistInfo(0, 1, 0, device)
    task = get_task("classification")
    data = DataConfig(root=str(root / "imagenet"), image_size=224, augment="deit", select_size=0)
    train = task.datasets(data).train
    workers = resolve_workers("auto", info)
    loader = make_loaders(Splits(train, None, train, {}), batch, info, seed=0, workers=workers).train
    model = timm.create_model(arch.removeprefix("timm:"), num_classes=len(train.classes)).to(device).train()
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10 * steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels) + pruner.sparsity_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pruner.step()

    def timed(batches) -> float:
        start, done = None, 0
        for images, labels in batches:
            images, labels = to_device((images, labels), device)
            step(images, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if start is None:
                start = time.perf_counter()  # the first step (worker start, warm-up) is not timed
                continue
            done += 1
            if done == steps:
                break
        return (time.perf_counter() - start) / done

    def from_loader():
        epoch = 0
        while True:
            loader.sampler.set_position(epoch, 0)
            yield from loader
            epoch += 1

    fed = timed(from_loader())
    kept = next(iter(loader))
    gpu_only = timed(iter(lambda: kept, None))
    return {
        "model": arch,
        "batch": batch,
        "workers": workers,
        "fed_step_s": fed,
        "gpu_step_s": gpu_only,
        "ratio": fed / gpu_only,
    }


def table(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}; {result['images']} images per pipeline, batch {BATCH}, two epochs timed from "
        "the first batch. Images per second (higher is better).",
        "",
        "| pipeline | input | 0 workers | 1 worker | 2 workers | 2 workers / 0 |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["pipelines"].items():
        r = row["images_per_s"]
        lines.append(
            f"| {name} | {row['input']} | {r['0']:.0f} | {r['1']:.0f} | {r['2']:.0f} | {r['2'] / r['0']:.2f}x |"
        )
    lines += [
        "",
        "Decoding alone, one core (images per second):",
        "",
        "| input | " + " | ".join(next(iter(result["decode"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(result["decode"].values()))),
    ]
    for name, rates in result["decode"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.0f}" for v in rates.values()) + " |")
    lines += [
        "",
        "Workers per GPU a search needs (GPU images per second / one worker's images per second on this machine's "
        "cores, rounded up):",
        "",
        "| GPU run | GPU images/s | pipeline | one worker, images/s | workers per GPU |",
        "|---|---|---|---|---|",
    ]
    for model, row in result["projection"].items():
        lines.append(
            f"| {model} ({row['device']}) | {row['gpu_images_per_s']:.0f} | {row['pipeline']} | "
            f"{row['worker_images_per_s']:.0f} | {row['workers']} |"
        )
    if "end_to_end" in result:
        e = result["end_to_end"]
        lines += [
            "",
            f"End to end on {result.get('device', 'the device')}: {e['model']} search steps at batch "
            f"{e['batch']} fed by {e['workers']} workers take {e['fed_step_s']:.3f} s, against "
            f"{e['gpu_step_s']:.3f} s on a batch kept on the device: {e['ratio']:.2f}x.",
        ]
    r = result["rerank"]
    lines += [
        "",
        f"BLIP retrieval's rerank at BLIP-base width: {r['cpu_s_per_1000_pairs']:.1f} s per 1,000 pairs on this "
        f"machine's CPU ({r['gflops_per_pair']:.1f} GFLOPs a pair); COCO's {r['coco_pairs'] / 1e6:.2f}M pairs "
        f"would take {r['coco_cpu_hours']:.0f} hours here.",
    ]
    if "gpu" in r:
        g = r["gpu"]
        lines[-1] += (
            f" At the {g['tflops_per_s']:.0f} TFLOP/s the {g['device']} trained BLIP-base NLVR2 at, about "
            f"{g['coco_minutes']:.0f} minutes on one GPU, shared out over the ranks of a run."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="images per folder")
    parser.add_argument("--out", default=str(RESULTS / "input_pipeline"), help="results path without extension")
    parser.add_argument("--device", default="cpu", help="cuda: also time an end-to-end search epoch on the GPU")
    parser.add_argument("--e2e-model", default="timm:deit_base_patch16_224")
    parser.add_argument("--e2e-batch", type=int, default=256)
    parser.add_argument("--e2e-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per loading process, as in a DataLoader worker
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "images": args.images,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "pipelines": {},
        "decode": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folders(root, args.images)
        for name, (dataset, what) in pipelines(root).items():
            rates = {str(w): throughput(dataset, w) for w in WORKERS}
            result["pipelines"][name] = {"input": what, "images_per_s": rates}
            print(name, {k: round(v, 1) for k, v in rates.items()}, flush=True)
        result["decode"]["ImageNet 500x375 (eval at 224)"] = decode_rates(root / "imagenet" / "val", 224)
        result["decode"]["COCO 640x480 (at 384)"] = decode_rates(root / "coco", 384)
        device = torch.device(args.device)
        if device.type != "cpu" or args.e2e_model != parser.get_default("e2e_model"):
            torch.set_num_threads(os.cpu_count() or 1)
            result["end_to_end"] = end_to_end(root, device, args.e2e_model, args.e2e_batch, args.e2e_steps)
            print("end to end", result["end_to_end"], flush=True)
    result["rerank"] = rerank_cost()
    print("rerank", result["rerank"], flush=True)
    result["projection"] = {}
    for model, gpu in gpu_rates().items():
        pipeline = FEEDS.get(model)
        if pipeline is None:
            continue
        one = result["pipelines"][pipeline]["images_per_s"]["1"]
        result["projection"][model] = {
            "device": gpu["device"],
            "gpu_images_per_s": gpu["images_per_s"],
            "pipeline": pipeline,
            "worker_images_per_s": one,
            "workers": math.ceil(gpu["images_per_s"] / one),
        }
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
