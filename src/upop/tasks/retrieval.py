"""Image-text retrieval: CLIP-style dual encoders (the symmetric contrastive loss with the model's own temperature,
R@1/5/10 both ways on the full similarity matrix, several captions per image: the Karpathy protocol) and BLIP (the
same contrastive ITC loss with BLIP's learnable temperature, plus ITM on matches and hard negatives drawn from the
batch by ITC similarity; evaluation ranks by ITC over the whole split and rescores each query's top ``rerank_k``
(``TaskOptions``) candidates by ITM, as BLIP does).

Loss: captions of the same image are positives of each other, not negatives (soft targets by image id, as BLIP's
ITC), and under DDP the features of every rank are gathered with their gradients, so the loss and its gradients are
those of the whole global batch on any number of ranks. With ``momentum_distill`` (``TaskOptions``) the loss is
BLIP's momentum distillation instead: each rank's features are contrasted with a momentum model's features of its
batch and a queue of earlier batches' (every rank's), against soft targets mixing the momentum model's similarities
(weight 0.4, ramped up over the first epoch of a phase) with the ground truth.

Data (``upop.data.captioned``): the built-in shapes world with templated captions, or Karpathy-split annotation
files as used for COCO and Flickr30K: ``DIR/*train.json``, ``DIR/*val.json`` (the selection split) and
``DIR/*test.json`` (the report split), each a JSON list of ``{"image": relative path, "caption": str or [str, ...]}``;
images are read from ``--image-root`` (default ``DIR``).

Models are reached through ``model(...)`` (so DDP sees every training forward) and, for evaluation, through their
encoders. Two conventions are understood: HF ``CLIPModel`` (``get_image_features``/``get_text_features``, forward
with ``pixel_values, input_ids, attention_mask``) and open_clip ``CLIP`` (``encode_image``/``encode_text``, forward
with ``image, text``). Captions are tokenised by the tokenizer of the model's bundle.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from upop.core.pruner import unmasked_copy
from upop.data.captioned import CaptionedImages, captioned_splits
from upop.data.config import DataConfig
from upop.data.splits import ROLES, Splits
from upop.data.text import CAPTION_WORDS, pre_caption
from upop.errors import UPopError
from upop.tasks.base import Task, evaluating, kl_distill, register_task
from upop.utils import dist as D
from upop.utils.dist import unwrap

KS = (1, 5, 10)
BLIP_TOKENS = 35  # BLIP's retrieval: captions padded and cut at 35 tokens
MOMENTUM, ITC_ALPHA = 0.995, 0.4  # BLIP's momentum distillation: the moving average and the momentum targets' weight
BLIP_TEMPERATURE = (0.001, 0.5)  # BLIP clamps its learnable temperature to this range at every step
CLIP_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its logit scale (log of 1 / temperature) to at most this


# ------------------------------------------------------------------------------------------------------ the model
def _is_hf(model: nn.Module) -> bool:
    return hasattr(unwrap(model), "get_image_features")


def _is_blip(model: nn.Module) -> bool:
    """A BLIP retrieval model (``upop.models.blip.modeling.BlipRetrieval``): ITC features and an ITM head."""
    return hasattr(unwrap(model), "itm_head")


def _features(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


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


PAIRS_PER_CALL = 256  # image-caption pairs per ITM call of the rerank (at least k: one query's candidates)


@torch.no_grad()
def blip_rerank(
    model: nn.Module,
    data: CaptionedImages,
    tokens: dict[str, torch.Tensor],
    sims: torch.Tensor,
    k: int,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's evaluation: each image's top ``k`` captions and each caption's top ``k`` images by ITC similarity are
    rescored by ITM (its match logit plus the ITC similarity); everything outside the top k scores -100. ``tokens``:
    every caption of ``data``, tokenised, on the model's device. Returns the (images x captions) score matrices of
    the image->text and the text->image direction.

    The queries are shared out over the ranks (rank r rescores queries r, r + W, ...; ``sims`` is the same on every
    rank), and the candidate pairs of all of a rank's queries go through ITM in calls of ``max(k,
    PAIRS_PER_CALL)`` pairs, so COCO's 5k images x 25k captions (7.7M pairs at k 256) keep every GPU busy."""
    m = unwrap(model)
    device = tokens["input_ids"].device
    embeds = torch.cat([m.image_embeds(x.to(device)) for x in DataLoader(data, batch_size=batch)])
    n_img, n_txt = sims.shape
    rank, world = D.rank_and_size()
    top_i2t_sim, top_i2t = sims.topk(min(k, n_txt), dim=1)  # each image's candidate captions
    top_t2i_sim, top_t2i = sims.T.topk(min(k, n_img), dim=1)  # each caption's candidate images
    mine_img = torch.arange(rank, n_img, world, device=sims.device)
    mine_txt = torch.arange(rank, n_txt, world, device=sims.device)
    images = torch.cat([mine_img.repeat_interleave(top_i2t.shape[1]), top_t2i[mine_txt].flatten()])
    texts = torch.cat([top_i2t[mine_img].flatten(), mine_txt.repeat_interleave(top_t2i.shape[1])])
    scores = torch.empty(len(images), device=sims.device)
    step = max(k, PAIRS_PER_CALL)
    for s in range(0, len(images), step):
        i, t = images[s : s + step].to(device), texts[s : s + step].to(device)
        scores[s : s + step] = m.itm(tokens["input_ids"][t], tokens["attention_mask"][t], embeds[i])[:, 1].float()
    split = len(mine_img) * top_i2t.shape[1]
    i2t_scores, t2i_scores = torch.zeros_like(top_i2t_sim), torch.zeros_like(top_t2i_sim)
    i2t_scores[mine_img] = scores[:split].view(len(mine_img), -1) + top_i2t_sim[mine_img]
    t2i_scores[mine_txt] = scores[split:].view(len(mine_txt), -1) + top_t2i_sim[mine_txt]
    D.total(i2t_scores), D.total(t2i_scores)  # each rank filled its own queries' rows, zeros elsewhere
    i2t = torch.full_like(sims, -100.0).scatter_(1, top_i2t, i2t_scores)
    t2i = torch.full_like(sims.T, -100.0).scatter_(1, top_t2i, t2i_scores).T
    return i2t, t2i


def clamp_temperature(model: nn.Module) -> None:
    """Clamp the contrastive temperature in place: BLIP's ``temp`` to [0.001, 0.5], CLIP's logit scale to <= ln 100."""
    m = unwrap(model)
    with torch.no_grad():
        if _is_blip(m):
            m.temp.clamp_(*BLIP_TEMPERATURE)
        elif isinstance(getattr(m, "logit_scale", None), torch.Tensor):
            m.logit_scale.clamp_(0.0, CLIP_MAX_LOGIT_SCALE)


class Momentum:
    """BLIP's momentum distillation state: a moving average of the model (unmasked, no gradients) and queues of
    L2-normalised image and text features with their image ids (-100: the random start, never a positive).

    ``update`` moves the average towards the model before each step (as BLIP does, before the momentum features are
    computed); a model of another architecture than the average's (the compressed one after the search) restarts the
    average from its weights, as the original copies the compressed weights into its momentum encoders. The queues
    carry over. ``enqueue`` writes every rank's features (so the queues are the same on every rank)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.model: nn.Module | None = None
        self.queue: dict[str, torch.Tensor] = {}
        self.pointer = 0
        self.pending: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _shapes(model: nn.Module) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> nn.Module:
        live = unwrap(model)
        if self.model is None or self._shapes(self.model) != self._shapes(live):
            self.model = unmasked_copy(live).requires_grad_(False)
            pending, self.pending = self.pending, None
            if pending is None:  # a fresh average starts at the model itself
                return self.model
            self.model.load_state_dict(pending)  # a checkpoint's average: this step moves it on, as uninterrupted
        mine, theirs = list(self.model.parameters()), [p.detach() for p in live.parameters()]
        torch._foreach_mul_(mine, MOMENTUM)
        torch._foreach_add_(mine, theirs, alpha=1 - MOMENTUM)
        return self.model

    def queued(self, dim: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The queues (image (Q, dim), text (Q, dim), ids (Q,)); random unit features with id -100 at the start, the
        same on every rank."""
        if not self.queue:
            start = F.normalize(torch.randn(2, self.size, dim, device=device), dim=-1)
            start = D.broadcast_from_main(start)
            ids = torch.full((self.size,), -100, dtype=torch.long, device=device)
            self.queue = {"image": start[0], "text": start[1], "ids": ids}
        return {k: v.to(device) for k, v in self.queue.items()}

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        image, text, ids = D.gather(image.float()), D.gather(text.float()), D.gather(ids)
        slots = (self.pointer + torch.arange(len(ids), device=ids.device)) % self.size
        for key, value in (("image", image), ("text", text), ("ids", ids)):
            self.queue[key] = self.queue[key].to(ids.device)
            self.queue[key][slots] = value.to(self.queue[key].dtype)
        self.pointer = int((self.pointer + len(ids)) % self.size)

    def state_dict(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "queue": {k: v.detach().cpu() for k, v in self.queue.items()},
            "pointer": self.pointer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.model, self.pending = None, dict(state["model"])
        self.queue, self.pointer = dict(state["queue"]), int(state["pointer"])


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.momentum = Momentum(self.options.queue_size)
        self.alpha = ITC_ALPHA

    def datasets(self, data: DataConfig, roles: tuple[str, ...] = ROLES) -> Splits:
        return captioned_splits(data, roles, self.name)

    def begin_step(self, epoch: int, index: int, steps: int) -> None:
        """The momentum targets' weight: ramped linearly from 0 over the first epoch of a phase, as BLIP's."""
        self.alpha = ITC_ALPHA * (min(1.0, index / max(1, steps)) if epoch == 0 else 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": self.momentum.state_dict()} if self.options.momentum_distill else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.momentum.load_state_dict(state.get("momentum") or {})

    def texts(self, model: nn.Module, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Captions as UPop's code feeds them (BLIP's ``pre_caption``, 30 words; for CLIP too), tokenised: at most
        ``BLIP_TOKENS`` tokens for a BLIP model, as BLIP's retrieval does."""
        cleaned = [pre_caption(c, CAPTION_WORDS) for c in captions]
        return self.tokenize(cleaned, device, BLIP_TOKENS if _is_blip(model) else None)

    def outputs(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Logits of the local images against the global batch's captions and of the local captions against the
        global batch's images (B, N), with their soft targets; with momentum distillation (in training), against
        the momentum model's captions and images of the batch and the queue (B, B + Q)."""
        images, captions, ids = batch
        if self.options.clamp_temperature:
            clamp_temperature(model)
        tokens = self.texts(model, captions, images.device)
        extra: dict[str, torch.Tensor] = {}
        if _is_blip(model):  # ITC features, and ITM on matches and hard negatives
            out = model(
                pixel_values=images, **tokens, image_ids=ids, negatives_all_ranks=self.options.negatives_all_ranks
            )
            img, txt, scale = out["image_feat"], out["text_feat"], 1.0 / out["temp"]
            extra = {"itm": out["itm"], "itm_labels": out["itm_labels"]}
        else:
            img, txt, scale = embeddings(model, images, tokens)
        img, txt = img.float(), txt.float()
        if self.options.momentum_distill and model.training:
            return {**self._momentum_outputs(model, images, tokens, ids, img, txt, scale), **extra}
        img_all, txt_all = D.gather_with_grad(img), D.gather_with_grad(txt)
        targets = soft_targets(ids, D.gather(ids))
        return {
            "i2t": scale * img @ txt_all.T,
            "t2i": scale * txt @ img_all.T,
            "i2t_targets": targets,
            "t2i_targets": targets,
            **extra,
        }

    def _momentum_outputs(self, model, images, tokens, ids, img, txt, scale) -> dict[str, torch.Tensor]:
        """BLIP's ITC with momentum distillation: logits against the momentum model's features of the batch and the
        queue, targets alpha x its softmax similarities + (1 - alpha) x the ground truth; then the queue takes the
        batch's features (BLIP's momentum ones; CLIP's code queues the model's own)."""
        with torch.no_grad():
            teacher = self.momentum.update(model)
            img_m = encode_images(teacher, images)
            txt_m = encode_texts(teacher, tokens)
            queue = self.momentum.queued(img.shape[1], img.device)
            img_all, txt_all = torch.cat([img_m, queue["image"]]), torch.cat([txt_m, queue["text"]])
            truth = soft_targets(ids, torch.cat([ids, queue["ids"]]))
            scale_m = scale.detach() if isinstance(scale, torch.Tensor) else scale
            i2t_targets = self.alpha * F.softmax(scale_m * img_m @ txt_all.T, 1) + (1 - self.alpha) * truth
            t2i_targets = self.alpha * F.softmax(scale_m * txt_m @ img_all.T, 1) + (1 - self.alpha) * truth
        out = {
            "i2t": scale * img @ txt_all.T,
            "t2i": scale * txt @ img_all.T,
            "i2t_targets": i2t_targets,
            "t2i_targets": t2i_targets,
        }
        queued = (img_m, txt_m) if _is_blip(model) else (img.detach(), txt.detach())
        self.momentum.enqueue(*queued, ids)
        return out

    def loss_from(self, outputs: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """The contrastive (ITC) loss; for BLIP plus the ITM cross-entropy over matches and hard negatives."""
        i2t = torch.sum(-outputs["i2t_targets"] * F.log_softmax(outputs["i2t"].float(), dim=1), dim=1).mean()
        t2i = torch.sum(-outputs["t2i_targets"] * F.log_softmax(outputs["t2i"].float(), dim=1), dim=1).mean()
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
        data: CaptionedImages = loader.dataset
        with evaluating(model):
            img = torch.cat(
                [encode_images(model, x.to(device)) for x in DataLoader(data, batch_size=loader.batch_size or 64)]
            )
            step = loader.batch_size or 64
            txt = torch.cat(
                [
                    encode_texts(model, self.texts(model, data.captions[i : i + step], device))
                    for i in range(0, len(data.captions), step)
                ]
            )
            sims = img @ txt.T
            if not _is_blip(model):
                return recall_at_k(sims, data.txt2img)
            tokens = self.texts(model, data.captions, device)
            i2t, t2i = blip_rerank(model, data, tokens, sims, self.options.rerank_k, step)
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
        return model_inputs(model, images.to(device), self.texts(model, data_captions, device))
