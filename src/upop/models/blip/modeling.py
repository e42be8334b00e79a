"""BLIP models built from HF transformers BLIP parts, and the key map of the original BLIP checkpoints.

``BlipNlvr`` is BLIP's NLVR2 model (HF has no class for it): one ``BlipVisionModel`` encodes both images; the text
encoder is BLIP's BERT (HF ``BlipTextEmbeddings``/``BlipTextLayer``) whose cross-attention is twin: in every layer
one branch attends to the left image and one to the right, each with its own query/key/value and output projection.
In the first half of the layers the two branch outputs are averaged, in the second half concatenated and merged by
a Linear(2h -> h) (the released checkpoints apply no activation there), then added to the input and normalised. The
first text token is replaced by the encoder token; a Linear-ReLU-Linear head on its final state gives 2 logits
(False, True).

The released BLIP checkpoints' keys map to these models' in ``upop.models.blip.checkpoints``; HF BLIP directories
load through ``upop.models.blip.hf``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.blip.configuration_blip import BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextEmbeddings, BlipTextLayer, BlipTextSelfAttention

from upop.utils import dist as D


class TwinBranch(nn.Module):
    """One image's half of a twin cross-attention: BLIP's text cross-attention (queries from the text, keys and values
    from the image) and its own output projection."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.self = BlipTextSelfAttention(config, True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.dense(self.self(hidden, encoder_hidden_states=image)[0])


class TwinCrossAttention(nn.Module):
    def __init__(self, config: BlipTextConfig, merge: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList([TwinBranch(config), TwinBranch(config)])
        self.merge_layer = nn.Linear(2 * config.hidden_size, config.hidden_size) if merge else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, images: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        left, right = (branch(hidden, image) for branch, image in zip(self.branches, images))
        if self.merge_layer is None:
            return self.LayerNorm(self.dropout((left + right) / 2) + hidden)
        mixed = self.merge_layer(torch.cat([left, right], dim=-1))
        return self.LayerNorm(self.dropout(mixed) + hidden)


class NlvrTextLayer(BlipTextLayer):
    """BLIP's text layer (self-attention, MLP) with a twin cross-attention between them."""

    def __init__(self, config: BlipTextConfig, layer_num: int, merge: bool) -> None:
        super().__init__(config, layer_num)
        self.crossattention = TwinCrossAttention(config, merge)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, images: tuple) -> torch.Tensor:  # type: ignore[override]
        x = self.attention(hidden, attention_mask=mask)[0]
        x = self.crossattention(x, images)
        return self.output(self.intermediate(x), x)


class _Layers(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class NlvrTextEncoder(nn.Module):
    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        n = config.num_hidden_layers
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = _Layers([NlvrTextLayer(config, i, merge=i >= n // 2) for i in range(n)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: tuple) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask, images)
        return hidden


class BlipNlvr(nn.Module):
    """BLIP for NLVR2: ``forward(pixel_values (B, 2, 3, S, S), input_ids (B, L), attention_mask (B, L))`` -> logits
    (B, 2), index 1 = the statement is true."""

    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig, enc_token_id: int) -> None:
        super().__init__()
        text.encoder_hidden_size = vision.hidden_size
        self.vision_config, self.text_config, self.enc_token_id = vision, text, int(enc_token_id)
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = NlvrTextEncoder(text)
        h = text.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
        self.text_encoder.apply(self._init)
        self.cls_head.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        """BERT's initialisation (normal(0, initializer_range), zero biases, unit norms)."""
        std = getattr(self.text_config, "initializer_range", 0.02)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b = pixel_values.shape[0]
        image = self.vision_model(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state.unflatten(0, (b, 2))
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        hidden = self.text_encoder(ids, attention_mask, (image[:, 0], image[:, 1]))
        return self.cls_head(hidden[:, 0])


class BlipRetrieval(nn.Module):
    """BLIP for image-text retrieval, with the submodule names of HF's ``BlipForImageTextRetrieval`` and of the
    released checkpoints: ``vision_model``, ``text_encoder`` (BLIP's BERT with cross-attention), ``vision_proj``,
    ``text_proj``, ``itm_head`` and the learnable ITC temperature ``temp`` (HF's class has none; 0.07 at the start, as
    BLIP's).

    ``forward(pixel_values, input_ids, attention_mask, image_ids=None)`` returns a dict: L2-normalised ``image_feat``
    and ``text_feat`` (ITC, the text encoder without cross-attention on the [CLS] token), ``temp``, and the ITM logits
    (the encoder token's final state with cross-attention to the image, 2 classes): ``itm`` for the matching pairs and,
    given ``image_ids``, for one hard negative text per image and one hard negative image per text, drawn from the
    batch by ITC similarity (never of the same image id), as BLIP's ITM; ``itm_labels`` says which are matches."""

    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig, embed_dim: int, enc_token_id: int) -> None:
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        text.encoder_hidden_size = vision.hidden_size
        self.vision_config, self.text_config, self.enc_token_id = vision, text, int(enc_token_id)
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.vision_proj = nn.Linear(vision.hidden_size, embed_dim)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim)
        self.itm_head = nn.Linear(text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_feat(self, embeds: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) of texts and images (their vision embeddings) pair by pair."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        hidden = self.text_encoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
        ).last_hidden_state
        return self.itm_head(hidden[:, 0])

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        negatives_all_ranks: bool = False,
    ) -> dict[str, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.image_embeds(pixel_values)
        image_feat, text_feat = self.image_feat(embeds), self.text_feat(input_ids, attention_mask)
        out = {"image_feat": image_feat, "text_feat": text_feat, "temp": self.temp}
        if image_ids is None:
            out["itm"] = self.itm(input_ids, attention_mask, embeds)
            return out
        pool = _negative_pool(embeds, image_feat, text_feat, input_ids, attention_mask, image_ids, negatives_all_ranks)
        with torch.no_grad():  # hard negatives: sampled by ITC similarity among other images' samples
            other = image_ids[:, None] != pool["ids"][None, :]
            weights = lambda s: torch.softmax(s.float(), dim=1) * other + 1e-12  # noqa: E731
            neg_text = torch.multinomial(weights(image_feat @ pool["text_feat"].T / self.temp), 1).squeeze(1)
            neg_image = torch.multinomial(weights(text_feat @ pool["image_feat"].T / self.temp), 1).squeeze(1)
        ids, mask = _common_length(input_ids, attention_mask, pool["input_ids"].shape[1])
        ids = torch.cat([ids, pool["input_ids"][neg_text], ids])
        mask = torch.cat([mask, pool["attention_mask"][neg_text], mask])
        images = torch.cat([embeds, embeds, pool["embeds"][neg_image]])
        b = input_ids.shape[0]
        out["itm"] = self.itm(ids, mask, images)
        labels = torch.zeros(3 * b, dtype=torch.long, device=ids.device)
        labels[:b] = 1
        out["itm_labels"] = labels
        return out


def _common_length(ids: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask right-padded (id 0, mask 0) to ``length``."""
    pad = length - ids.shape[1]
    if pad <= 0:
        return ids, mask
    return F.pad(ids, (0, pad)), F.pad(mask, (0, pad))


def _negative_pool(embeds, image_feat, text_feat, input_ids, attention_mask, image_ids, all_ranks) -> dict:
    """Where ITM's hard negatives are drawn from: the rank's own batch, or (``all_ranks``, BLIP's
    ``negative_all_rank``) every rank's, the vision embeddings gathered with their gradients, the rest without;
    captions padded to the longest rank's so they can be gathered."""
    pool = {
        "embeds": embeds,
        "image_feat": image_feat.detach(),
        "text_feat": text_feat.detach(),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "ids": image_ids,
    }
    if not all_ranks or not D.is_distributed():
        return pool
    length = int(D.gather(torch.tensor([input_ids.shape[1]], device=input_ids.device)).max())
    ids, mask = _common_length(input_ids, attention_mask, length)
    pool.update(input_ids=ids, attention_mask=mask)
    gathered = {k: D.gather(v) for k, v in pool.items() if k != "embeds"}
    return {**gathered, "embeds": D.gather_with_grad(embeds)}


class BlipVqa(nn.Module):
    """BLIP for VQA, with the submodule names of HF's ``BlipForQuestionAnswering`` and of the released checkpoints:
    ``vision_model``; ``text_encoder``, the question encoder (BLIP's BERT, cross-attending to the image; its first
    token is the encoder token); ``text_decoder``, the answer decoder (HF ``BlipTextLMHeadModel``: causal
    self-attention, cross-attention to the question's states, MLP, LM head).

    ``forward(pixel_values, input_ids, attention_mask, answer_ids, answer_mask, answer_owner=None)`` returns the
    decoder's logits (A, L, V) for A answers, answer a given question ``answer_owner[a]`` (default: one answer per
    question); the answers' first token is replaced by the decoder's start token. ``rank`` picks answers from a
    candidate list as BLIP does, ``generate`` decodes them with HF's ``generate`` (KV cache)."""

    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig, enc_token_id: int) -> None:
        from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

        super().__init__()
        text.encoder_hidden_size = vision.hidden_size
        decoder = copy.deepcopy(text)
        decoder.encoder_hidden_size = text.hidden_size  # the answer decoder attends to the question's states
        self.vision_config, self.text_config, self.enc_token_id = vision, text, int(enc_token_id)
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(decoder)

    def question_states(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        return self.text_encoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device),
        ).last_hidden_state

    def decode(
        self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        ids = answer_ids.clone()
        ids[:, 0] = self.text_config.bos_token_id
        return self.text_decoder(
            input_ids=ids, attention_mask=answer_mask, encoder_hidden_states=states, encoder_attention_mask=mask
        ).logits

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        answer_owner: torch.Tensor | None = None,
    ) -> torch.Tensor:
        states = self.question_states(pixel_values, input_ids, attention_mask)
        if answer_owner is not None:
            states, attention_mask = states[answer_owner], attention_mask[answer_owner]
        return self.decode(answer_ids, answer_mask, states, attention_mask)

    @torch.no_grad()
    def rank(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: int,
    ) -> torch.Tensor:
        """BLIP's rank inference: the index of each question's answer among the candidates (``answer_ids``, one row
        each): the ``k`` candidates whose first token is likeliest after the start token, then the one of those
        with the best ``answer_scores``."""
        states = self.question_states(pixel_values, input_ids, attention_mask)
        n, k = states.shape[0], min(k, answer_ids.shape[0])
        start = torch.full((n, 1), self.text_config.bos_token_id, dtype=torch.long, device=states.device)
        first = self.text_decoder(input_ids=start, encoder_hidden_states=states, encoder_attention_mask=attention_mask)
        first = first.logits[:, 0].float().log_softmax(-1)[:, answer_ids[:, 1]]  # (N, candidates)
        top = first.topk(k, dim=1).indices  # (N, k)
        best = []
        per = max(1, 1024 // k)  # questions per decoder call: at most ~1024 sequences at once
        for q in range(0, n, per):
            rows = top[q : q + per]
            ids, mask = answer_ids[rows].flatten(0, 1), answer_mask[rows].flatten(0, 1)
            score = self.answer_scores(
                ids,
                mask,
                states[q : q + per].repeat_interleave(k, 0),
                attention_mask[q : q + per].repeat_interleave(k, 0),
            ).view(-1, k)
            best.append(rows.gather(1, score.argmax(1, keepdim=True)).squeeze(1))
        return torch.cat(best)

    def answer_scores(
        self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Per answer (one row each, decoded after the question's ``states``), BLIP's rank score: minus the decoder's
        LM loss summed over the answer's tokens, with label smoothing 0.1 as BLIP's decoder computes it."""
        logits = self.decode(answer_ids, answer_mask, states, mask)[:, :-1].float()
        targets = answer_ids[:, 1:].masked_fill(answer_mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", label_smoothing=0.1
        )
        return -loss.view(targets.shape).sum(1)

    @torch.no_grad()
    def generate(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """Answer token ids (start token first) decoded by HF's ``generate`` with its KV cache; ``kwargs`` go to it
        (e.g. ``num_beams``, ``max_length``)."""
        states = self.question_states(pixel_values, input_ids, attention_mask)
        start = torch.full((states.shape[0], 1), self.text_config.bos_token_id, device=states.device)
        return self.text_decoder.generate(
            input_ids=start,
            eos_token_id=self.text_config.sep_token_id,
            pad_token_id=self.text_config.pad_token_id,
            encoder_hidden_states=states,
            encoder_attention_mask=attention_mask,
            **kwargs,
        )


def build_captioner(vision: BlipVisionConfig, text: BlipTextConfig) -> nn.Module:
    """HF ``BlipForConditionalGeneration`` of these configs."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    config = BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict())
    return BlipForConditionalGeneration(config)


def tiny_configs(
    image_size: int, patch_size: int, width: int, heads: int, depth: int, text_width: int, vocab: int, context: int
) -> tuple[BlipVisionConfig, BlipTextConfig]:
    vision = BlipVisionConfig(
        hidden_size=width,
        num_attention_heads=heads,
        num_hidden_layers=depth,
        intermediate_size=4 * width,
        image_size=image_size,
        patch_size=patch_size,
        # HF BLIP's vision default (1e-10) suits only loading weights over it, and BERT's 0.02 (for width 768)
        # leaves a narrow model's cross-attention too weak to learn from: 1/sqrt(width) in both
        initializer_range=width**-0.5,
    )
    text = BlipTextConfig(
        vocab_size=vocab,
        hidden_size=text_width,
        num_attention_heads=heads,
        num_hidden_layers=depth,
        intermediate_size=4 * text_width,
        encoder_hidden_size=width,
        max_position_embeddings=context,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=vocab - 1,
        sep_token_id=vocab - 1,
        initializer_range=text_width**-0.5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return vision, text
