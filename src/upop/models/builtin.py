"""Built-in tiny models (no download), small enough to train on 2 CPU cores: a timm ViT, an HF CLIP, BLIP for its four
tasks and a Segmenter, each with the word-level tokenizer of the built-in shapes world where it reads text."""

from __future__ import annotations

from dataclasses import dataclass

from upop.data.captions import WordTokenizer
from upop.data.questions import BLIP_GEN_VOCAB
from upop.data.statements import BLIP_VOCAB
from upop.models.blip.checkpoints import converter
from upop.models.bundle import Defaults, ModelBundle
from upop.models.registry import Family, register_family


@dataclass(frozen=True)
class BuiltinViT:
    """A timm VisionTransformer config."""

    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    kinds: tuple[str, ...] = ("classifier",)

    def build(self, kind: str, num_outputs: int, image_size: int) -> ModelBundle:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=image_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=True,
            num_classes=num_outputs,
        )
        return ModelBundle(model, "", kind)


@dataclass(frozen=True)
class BuiltinCLIP:
    """An HF CLIPModel config whose two towers have different widths, with the built-in captions' tokenizer."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_heads: int
    text_width: int
    text_heads: int
    depth: int
    embed_dim: int = 64
    kinds: tuple[str, ...] = ("dual_encoder",)

    def build(self, kind: str, num_outputs: int, image_size: int) -> ModelBundle:
        from transformers import CLIPConfig, CLIPModel

        tokenizer = WordTokenizer()
        text = dict(
            vocab_size=tokenizer.vocab_size,
            hidden_size=self.text_width,
            num_attention_heads=self.text_heads,
            num_hidden_layers=self.depth,
            intermediate_size=4 * self.text_width,
            max_position_embeddings=tokenizer.context_length,
            pad_token_id=tokenizer.pad_id,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
        )
        vision = dict(
            hidden_size=self.vision_width,
            num_attention_heads=self.vision_heads,
            num_hidden_layers=self.depth,
            intermediate_size=4 * self.vision_width,
            image_size=image_size,
            patch_size=self.patch_size,
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.embed_dim))
        return ModelBundle(model, "", kind, tokenizer=tokenizer)


@dataclass(frozen=True)
class BuiltinBLIP:
    """A BLIP (vision and text of one depth and head count) with the built-in captions' and statements' tokenizer:
    ``BlipNlvr`` for NLVR, ``BlipRetrieval`` for retrieval, HF's ``BlipForConditionalGeneration`` for captioning and
    ``BlipVqa`` for VQA (these two with the questions' and answers' words too, and 20 positions: BLIP generates up
    to 20 tokens). Each reads the released BLIP checkpoints' keys."""

    image_size: int
    patch_size: int
    width: int
    heads: int
    depth: int
    text_width: int
    kinds: tuple[str, ...] = ("nlvr", "dual_encoder", "captioner", "vqa")

    def build(self, kind: str, num_outputs: int, image_size: int) -> ModelBundle:
        from upop.models.blip.modeling import BlipNlvr, BlipRetrieval, BlipVqa, build_captioner, tiny_configs

        generative = kind in ("captioner", "vqa")
        tokenizer = WordTokenizer(20, BLIP_GEN_VOCAB) if generative else WordTokenizer(vocab=BLIP_VOCAB)
        vision, text = tiny_configs(
            image_size,
            self.patch_size,
            self.width,
            self.heads,
            self.depth,
            self.text_width,
            tokenizer.vocab_size,
            tokenizer.context_length,
        )
        enc = tokenizer.ids["<enc>"]
        if kind == "captioner":
            model = build_captioner(vision, text)
        elif kind == "vqa":
            model = BlipVqa(vision, text, enc)
        else:
            model = BlipNlvr(vision, text, enc) if kind == "nlvr" else BlipRetrieval(vision, text, self.width, enc)
        return ModelBundle(model, "", kind, tokenizer=tokenizer, convert_state=converter(kind))


@dataclass(frozen=True)
class BuiltinSegmenter:
    """A Segmenter (``upop.models.segmenter``: ViT encoder, mask-transformer decoder)."""

    image_size: int
    patch_size: int
    width: int
    heads: int
    depth: int
    decoder_depth: int
    kinds: tuple[str, ...] = ("segmenter",)

    def build(self, kind: str, num_outputs: int, image_size: int) -> ModelBundle:
        from upop.models.segmenter.modeling import build_segmenter

        decoder = {"name": "mask_transformer", "n_layers": self.decoder_depth, "n_heads": self.heads}
        net = dict(
            image_size=image_size,
            patch_size=self.patch_size,
            d_model=self.width,
            n_heads=self.heads,
            n_layers=self.depth,
            n_cls=num_outputs,
            decoder=decoder,
        )
        return ModelBundle(build_segmenter(net), "", kind)


BUILTIN_MODELS: dict[str, BuiltinViT | BuiltinCLIP | BuiltinBLIP | BuiltinSegmenter] = {
    "vit-tiny": BuiltinViT(image_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2),
    "vit-micro": BuiltinViT(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "clip-tiny": BuiltinCLIP(
        image_size=32, patch_size=8, vision_width=64, vision_heads=2, text_width=48, text_heads=2, depth=3
    ),
    "clip-micro": BuiltinCLIP(
        image_size=16, patch_size=4, vision_width=32, vision_heads=2, text_width=24, text_heads=2, depth=2, embed_dim=16
    ),
    "blip-tiny": BuiltinBLIP(image_size=32, patch_size=8, width=64, heads=2, depth=3, text_width=64),
    "blip-micro": BuiltinBLIP(image_size=16, patch_size=4, width=32, heads=2, depth=2, text_width=24),
    "segmenter-tiny": BuiltinSegmenter(image_size=32, patch_size=4, width=64, heads=2, depth=4, decoder_depth=2),
    "segmenter-micro": BuiltinSegmenter(image_size=16, patch_size=4, width=32, heads=2, depth=2, decoder_depth=1),
}


class Builtin(Family):
    """The built-in names (``vit-tiny``...): each is one of the configs above."""

    name = "builtin"
    usage = tuple((kind, name, "") for name, config in BUILTIN_MODELS.items() for kind in config.kinds)

    def owns(self, spec: str) -> str | None:
        return spec if spec in BUILTIN_MODELS else None

    def kinds_of(self, arg: str) -> tuple[str, ...]:
        return BUILTIN_MODELS[arg].kinds

    def defaults(self, arg: str) -> Defaults:
        return Defaults(image_size=BUILTIN_MODELS[arg].image_size)

    def build(self, arg: str, kind: str, num_outputs: int, image_size: int | None, weights: bool) -> ModelBundle:
        config = BUILTIN_MODELS[arg]
        size = image_size or config.image_size
        bundle = config.build(kind, num_outputs, size)
        bundle.spec, bundle.image_size = arg, size
        return bundle


register_family(Builtin())
