"""Image-text retrieval: CLIP-style dual encoders (the symmetric contrastive loss with the model's own temperature,
R@1/5/10 both ways on the full similarity matrix, several captions per image: the Karpathy protocol) and BLIP (the
same contrastive ITC loss with BLIP's learnable temperature, plus ITM on matches and hard negatives drawn from the
batch by ITC similarity; evaluation ranks by ITC over the whole split and rescores each query's top ``RERANK_K``
candidates by ITM, as BLIP does).

Loss: captions of the same image are positives of each other, not negatives (soft targets by image id, as BLIP's
ITC), and under DDP the features of every rank are gathered with their gradients, so the loss and its gradients are
those of the whole global batch on any number of ranks.

Data: the built-in shapes world with templated captions (``upop.data.captions``), or Karpathy-split annotation files
as used for COCO and Flickr30K: ``DIR/*train.json``, ``DIR/*val.json`` (the selection split) and ``DIR/*test.json``
(the report split), each a JSON list of ``{"image": relative path, "caption": str or [str, ...]}``; images are read
from ``--image-root`` (default ``DIR``).

Models are reached through ``model(...)`` (so DDP sees every training forward) and, for evaluation, through their
encoders. Two conventions are understood: HF ``CLIPModel`` (``get_image_features``/``get_text_features``, forward
with ``pixel_values, input_ids, attention_mask``) and open_clip ``CLIP`` (``encode_image``/``encode_text``, forward
with ``image, text``). Captions are tokenised by the tokenizer the model was built with (``model.upop_tokenizer``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from upop.data.captions import CAPTIONS_PER_SCENE, scene_captions
from upop.data.shapes import ShapesWorld
from upop.utils import dist as D
from upop.utils.dist import unwrap
from upop.errors import UPopError
from upop.tasks.base import DataConfig, Splits, Task, evaluating, kl_distill, read_annotation, register_task

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
KS = (1, 5, 10)
RERANK_K = 128  # BLIP: candidates per query rescored by ITM (the reference uses 256 for COCO, 128 for Flickr30K)


# ------------------------------------------------------------------------------------------------------------ data
class RetrievalPairs(Dataset):
    """Training pairs: one (image, caption, image id) per caption."""

    def __init__(self, images: Callable[[int], torch.Tensor], captions: list[str], txt2img: torch.Tensor) -> None:
        self.images, self.captions, self.txt2img = images, captions, txt2img

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        image = int(self.txt2img[i])
        return self.images(image), self.captions[i], image


class RetrievalImages(Dataset):
    """Evaluation split: the images (items), and every caption with the image it belongs to (``txt2img``)."""

    def __init__(
        self, images: Callable[[int], torch.Tensor], n_images: int, captions: list[str], txt2img: torch.Tensor
    ) -> None:
        self.images, self.n_images, self.captions, self.txt2img = images, n_images, captions, txt2img

    def __len__(self) -> int:
        return self.n_images

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images(i)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def shapes_split(n: int, seed: int, image_size: int, noise: float) -> tuple[Callable, list[str], torch.Tensor]:
    """Rendered images (kept as uint8), captions and caption->image index of ``n`` built-in scenes."""
    world = ShapesWorld(n, seed=seed, image_size=image_size, noise=noise)
    chunks = []
    for start in range(0, n, 4096):
        x, _ = world.render(torch.arange(start, min(n, start + 4096)))
        chunks.append((x * 255).round().to(torch.uint8))
    pixels = torch.cat(chunks)
    captions = [c for i in range(n) for c in scene_captions(world, i)]
    txt2img = torch.arange(n).repeat_interleave(CAPTIONS_PER_SCENE)
    return (lambda i: _normalise(pixels[i].float() / 255)), captions, txt2img


def read_karpathy(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(image paths in first-seen order, captions, caption->image index) of a Karpathy-format annotation file."""
    entries = read_annotation(path, "'image', 'caption'")
    images: dict[str, int] = {}
    captions: list[str] = []
    owner: list[int] = []
    for n, entry in enumerate(entries):
        caption = entry.get("caption") if isinstance(entry, dict) else None
        image = entry.get("image") if isinstance(entry, dict) else None
        texts = [caption] if isinstance(caption, str) else caption
        if (
            not isinstance(image, str)
            or not isinstance(texts, list)
            or not texts
            or not all(isinstance(t, str) for t in texts)
        ):
            raise UPopError(
                f"annotation file {path}, entry {n}: expected {{'image': relative path, 'caption': str or list of "
                f"str}}, got {json.dumps(entry)[:120]}"
            )
        index = images.setdefault(image, len(images))
        captions.extend(texts)
        owner.extend([index] * len(texts))
    return list(images), captions, torch.tensor(owner)


SPLIT_ROLES = {"train": "training", "val": "selection", "test": "report"}


def _annotation(root: Path, split: str) -> Path:
    found = sorted(root.glob(f"*{split}.json"))
    if len(found) > 1:
        raise UPopError(f"{root} holds several *{split}.json files ({', '.join(p.name for p in found)}); keep one")
    if not found:
        raise UPopError(
            f"{root} has no *{split}.json annotation file (the {SPLIT_ROLES[split]} split; Karpathy format: a list of "
            "image/caption entries, with *train.json, *val.json and *test.json)"
        )
    return found[0]


def image_reader(image_root: Path, paths: list[str], image_size: int, crop: bool) -> Callable[[int], torch.Tensor]:
    """``load(i)``: the image ``image_root / paths[i]`` as RGB, resized (bicubic) to ``image_size`` square, or with
    ``crop`` its shorter side resized and centre-cropped, normalised with CLIP's mean and std; one clear line when a
    file cannot be read."""
    from PIL import Image
    from torchvision import transforms

    size = image_size if crop else (image_size, image_size)
    steps = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)]
    steps += [transforms.CenterCrop(image_size)] if crop else []
    tf = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])

    def load(i: int) -> torch.Tensor:
        try:
            with Image.open(image_root / paths[i]) as im:
                return tf(im.convert("RGB"))
        except OSError as e:
            raise UPopError(f"cannot read the image {image_root / paths[i]}: {e}") from None

    return load


def folder_split(
    root: Path, image_root: Path, split: str, image_size: int
) -> tuple[Callable, int, list[str], torch.Tensor]:
    annotation = _annotation(root, split)
    paths, captions, txt2img = read_karpathy(annotation)
    missing = [p for p in paths if not (image_root / p).is_file()]
    if missing:
        raise UPopError(
            f"{len(missing)} image(s) named in {annotation} do not exist under {image_root}, e.g. {missing[0]}"
        )
    return image_reader(image_root, paths, image_size, crop=True), len(paths), captions, txt2img


# ------------------------------------------------------------------------------------------------------ the model
def _is_hf(model: nn.Module) -> bool:
    return hasattr(unwrap(model), "get_image_features")


def _is_blip(model: nn.Module) -> bool:
    """A BLIP retrieval model (``upop.blip.BlipRetrieval``): ITC features and an ITM head."""
    return hasattr(unwrap(model), "itm_head")


def _features(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def tokenize(model: nn.Module, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    tokenizer = getattr(unwrap(model), "upop_tokenizer", None)
    if tokenizer is None:
        raise UPopError(f"this {type(unwrap(model)).__name__} carries no tokenizer; build it with upop.models")
    tokens = tokenizer(list(captions))
    if isinstance(tokens, torch.Tensor):
        tokens = {"input_ids": tokens}
    return {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}


def model_inputs(model: nn.Module, images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> Any:
    """The forward inputs of both towers, in the model's own convention."""
    if _is_hf(model) or _is_blip(model):
        return {"pixel_values": images, **tokens}
    return (images, tokens["input_ids"])


def embeddings(model: nn.Module, images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> tuple:
    """(image features (B, E), text features (B, E), both L2-normalised, and the logit scale exp(t)) through
    ``model``'s forward, so a DDP wrapper synchronises every parameter the loss used."""
    if _is_hf(model):
        out = model(**model_inputs(model, images, tokens))
        return out.image_embeds, out.text_embeds, unwrap(model).logit_scale.exp()
    out = model(*model_inputs(model, images, tokens))
    if isinstance(out, dict):
        img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    else:
        img, txt, scale = out[0], out[1], out[2]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale


def soft_targets(ids: torch.Tensor, ids_all: torch.Tensor) -> torch.Tensor:
    """(B, N) targets: each row spreads 1 over the global batch's samples of the same image (itself included)."""
    same = (ids[:, None] == ids_all[None, :]).float()
    return same / same.sum(1, keepdim=True)


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    m = unwrap(model)
    if _is_blip(m):
        return m.image_feat(m.image_embeds(images)).float()
    x = _features(m.get_image_features(pixel_values=images)) if _is_hf(m) else m.encode_image(images)
    return F.normalize(x.float(), dim=-1)


def encode_texts(model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    m = unwrap(model)
    if _is_blip(m):
        return m.text_feat(tokens["input_ids"], tokens["attention_mask"]).float()
    x = _features(m.get_text_features(**tokens)) if _is_hf(m) else m.encode_text(tokens["input_ids"])
    return F.normalize(x.float(), dim=-1)


@torch.no_grad()
def blip_rerank(
    model: nn.Module, data: RetrievalImages, sims: torch.Tensor, device: torch.device, k: int, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's evaluation: each image's top ``k`` captions and each caption's top ``k`` images by ITC similarity are
    rescored by ITM (its match logit plus the ITC similarity); everything outside the top k scores -100. Returns the
    (images x captions) score matrices of the image->text and the text->image direction."""
    m = unwrap(model)
    embeds = torch.cat([m.image_embeds(x.to(device)) for x in DataLoader(data, batch_size=batch)])
    n_img, n_txt = sims.shape
    tokens = tokenize(model, data.captions, device)
    i2t = torch.full_like(sims, -100.0)
    for i in range(n_img):
        top_sim, top = sims[i].topk(min(k, n_txt))
        logits = m.itm(tokens["input_ids"][top], tokens["attention_mask"][top], embeds[i].expand(len(top), -1, -1))
        i2t[i, top] = logits[:, 1].float() + top_sim
    t2i = torch.full_like(sims, -100.0)
    for j in range(n_txt):
        top_sim, top = sims[:, j].topk(min(k, n_img))
        ids, mask = tokens["input_ids"][j].expand(len(top), -1), tokens["attention_mask"][j].expand(len(top), -1)
        t2i[top, j] = m.itm(ids, mask, embeds[top])[:, 1].float() + top_sim
    return i2t, t2i


# ---------------------------------------------------------------------------------------------------- the metric
def recall_at_k(sims: torch.Tensor, txt2img: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Karpathy-protocol recall (percent) from an (images x captions) similarity matrix.

    Image -> text: an image is a hit at K if any of its captions is among the K captions scoring highest for it (its
    rank is the number of captions scoring strictly higher than its best own caption). Text -> image: a caption is a
    hit at K if its image is among the K images scoring highest for it. Computed in row blocks on tensors, so 5k
    images x 25k captions needs no Python loop over pairs."""
    n_img, n_txt = sims.shape
    txt2img = txt2img.to(sims.device)
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=sims.device)
    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=sims.device)
    own = sims[txt2img, torch.arange(n_txt, device=sims.device)]  # score of each caption with its own image
    best_own = torch.full((n_img,), float("-inf"), device=sims.device).scatter_reduce(0, txt2img, own, "amax")
    for start in range(0, n_img, 1024):
        block = sims[start : start + 1024]
        i2t_rank[start : start + 1024] = (block > best_own[start : start + 1024, None]).sum(1)
    for start in range(0, n_txt, 4096):
        block = sims[:, start : start + 4096]
        t2i_rank[start : start + 4096] = (block > own[None, start : start + 4096]).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).float().mean())
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean())
    out["r_mean"] = sum(out.values()) / len(out)
    return out


@register_task
class Retrieval(Task):
    name = "retrieval"
    main_metric = "r_mean"
    model_kind = "dual_encoder"

    def datasets(self, data: DataConfig) -> Splits:
        if data.builtin:
            splits: dict[str, Any] = {}
            for name, size, seed in (
                ("train", data.train_size, data.seed),
                ("select", data.val_size if data.select_size is None else data.select_size, data.seed + 2),
                ("report", data.val_size, data.seed + 1),
            ):
                if size:
                    load, captions, owner = shapes_split(size, seed, data.image_size, data.noise)
                    splits[name] = (load, size, captions, owner, f"built-in scenes (seed {seed})")
        else:
            root = Path(data.root)
            if not root.is_dir():
                raise UPopError(f"dataset folder {root} does not exist")
            image_root = Path(data.image_root) if data.image_root else root
            splits = {}
            for name, split in (("train", "train"), ("select", "val"), ("report", "test")):
                if name == "select" and data.select_size == 0:
                    continue
                load, n, captions, owner = folder_split(root, image_root, split, data.image_size)
                splits[name] = (load, n, captions, owner, str(_annotation(root, split)))
        about = {
            name: {"source": source, "images": n, "captions": len(captions)}
            for name, (_, n, captions, _, source) in splits.items()
        }
        about["train"]["augment"] = "none"
        load, _, captions, owner, _ = splits["train"]
        train = RetrievalPairs(load, captions, owner)
        select = RetrievalImages(*splits["select"][:4]) if "select" in splits else None
        return Splits(train, select, RetrievalImages(*splits["report"][:4]), about)

    def num_outputs(self, train: Dataset) -> int:
        return 0  # a dual encoder has no task head

    def outputs(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Logits of the local images against the global batch's captions and of the local captions against the
        global batch's images (B, N), with the image ids of both."""
        images, captions, ids = batch
        tokens = tokenize(model, captions, images.device)
        extra: dict[str, torch.Tensor] = {}
        if _is_blip(model):  # ITC features, and ITM on matches and hard negatives
            out = model(pixel_values=images, **tokens, image_ids=ids)
            img, txt, scale = out["image_feat"], out["text_feat"], 1.0 / out["temp"]
            extra = {"itm": out["itm"], "itm_labels": out["itm_labels"]}
        else:
            img, txt, scale = embeddings(model, images, tokens)
        img, txt = img.float(), txt.float()
        img_all, txt_all = D.gather_with_grad(img), D.gather_with_grad(txt)
        return {
            "i2t": scale * img @ txt_all.T,
            "t2i": scale * txt @ img_all.T,
            "ids": ids,
            "ids_all": D.gather(ids),
            **extra,
        }

    def loss_from(self, outputs: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """The contrastive (ITC) loss; for BLIP plus the ITM cross-entropy over matches and hard negatives."""
        targets = soft_targets(outputs["ids"], outputs["ids_all"])
        i2t = torch.sum(-targets * F.log_softmax(outputs["i2t"].float(), dim=1), dim=1).mean()
        t2i = torch.sum(-targets * F.log_softmax(outputs["t2i"].float(), dim=1), dim=1).mean()
        itc = (i2t + t2i) / 2
        if "itm" in outputs:
            return itc + F.cross_entropy(outputs["itm"].float(), outputs["itm_labels"])
        return itc

    def distill_loss(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], temperature: float):
        i2t = kl_distill(student["i2t"], teacher["i2t"], temperature)
        return (i2t + kl_distill(student["t2i"], teacher["t2i"], temperature)) / 2

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """On every rank, the whole split (the similarity matrix needs every image and caption)."""
        data: RetrievalImages = loader.dataset
        with evaluating(model):
            img = torch.cat(
                [encode_images(model, x.to(device)) for x in DataLoader(data, batch_size=loader.batch_size or 64)]
            )
            step = loader.batch_size or 64
            txt = torch.cat(
                [
                    encode_texts(model, tokenize(model, data.captions[i : i + step], device))
                    for i in range(0, len(data.captions), step)
                ]
            )
            sims = img @ txt.T
            if not _is_blip(model):
                return recall_at_k(sims, data.txt2img)
            i2t, t2i = blip_rerank(model, data, sims, device, RERANK_K, step)
        out = {k: v for k, v in recall_at_k(i2t, data.txt2img).items() if k.startswith("i2t")}
        out.update({k: v for k, v in recall_at_k(t2i, data.txt2img).items() if k.startswith("t2i")})
        out["r_mean"] = sum(out.values()) / len(out)
        return out

    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        images = batch if isinstance(batch, torch.Tensor) else batch[0]
        if model is None:
            raise UPopError("retrieval example inputs need the model (its tokenizer and calling convention)")
        data_captions = ["a"] * len(images) if isinstance(batch, torch.Tensor) else list(batch[1])
        device = next(model.parameters()).device
        return model_inputs(model, images.to(device), tokenize(model, data_captions, device))
