"""Tiny models for every registered adapter, from one table. The property tests run over ``ADAPTER_MODELS``; a test
fails if an adapter is registered without an entry here, so registering is what gets a family tested."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from upop.adapters import registered_adapters


def timm_vit(heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    dim = heads * head_dim
    return VisionTransformer(
        img_size=image,
        patch_size=4,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_hidden / dim,
        qkv_bias=True,
        num_classes=5,
    )


def hf_vit(
    heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16, family: str = "vit"
) -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

    cfg_cls, model_cls = (
        (ViTConfig, ViTForImageClassification) if family == "vit" else (DeiTConfig, DeiTForImageClassification)
    )
    cfg = cfg_cls(
        hidden_size=heads * head_dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp_hidden,
        image_size=image,
        patch_size=4,
        num_labels=5,
    )
    return model_cls(cfg)


def hf_deit(**kw) -> nn.Module:
    return hf_vit(family="deit", **kw)


class DualEncoderUnderTest(nn.Module):
    """Calls a two-tower CLIP model as ``model(images)``, so that every property test can feed it images: the text
    tower reads token ids derived from the batch (fixed per batch size, with padding and a causal mask), and the
    output concatenates the image and text embeddings. The CLIP model is the child ``clip``."""

    def __init__(self, clip: nn.Module, vocab: int, length: int = 7) -> None:
        super().__init__()
        self.clip, self.vocab, self.length = clip, vocab, length

    def tokens(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(3, self.vocab - 1, (n, self.length), generator=g)
        lengths = torch.randint(2, self.length + 1, (n,), generator=g)
        pos = torch.arange(self.length)
        ids[pos >= lengths[:, None]] = 0  # padding
        ids[torch.arange(n), lengths - 1] = self.vocab - 1  # end-of-text: the highest id, at the end
        return ids, (pos < lengths[:, None]).long()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ids, attention = self.tokens(images.shape[0])
        if hasattr(self.clip, "get_image_features"):  # HF
            img = self.clip.get_image_features(pixel_values=images).pooler_output
            txt = self.clip.get_text_features(input_ids=ids, attention_mask=attention).pooler_output
        else:  # open_clip
            img, txt = self.clip.encode_image(images), self.clip.encode_text(ids)
        return torch.cat([img, txt], dim=-1)


def hf_clip(heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16) -> nn.Module:
    """HF CLIPModel; the text tower is wider per head and has another MLP width than the vision tower."""
    from transformers import CLIPConfig, CLIPModel

    vocab = 50
    text = dict(
        vocab_size=vocab,
        hidden_size=2 * (head_dim + 1),
        num_attention_heads=2,
        num_hidden_layers=depth,
        intermediate_size=mlp_hidden + 3,
        max_position_embeddings=16,
        eos_token_id=vocab - 1,
        pad_token_id=0,
        bos_token_id=1,
    )
    vision = dict(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_hidden_layers=depth,
        intermediate_size=mlp_hidden,
        image_size=image,
        patch_size=4,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
    return DualEncoderUnderTest(CLIPModel(config), vocab)


def open_clip_model(
    heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16
) -> nn.Module:
    """open_clip CLIP (nn.MultiheadAttention with packed in_proj); the text tower has another width and MLP ratio."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vocab = 50
    width = heads * head_dim
    vision = CLIPVisionCfg(
        layers=depth, width=width, head_width=head_dim, mlp_ratio=mlp_hidden / width, patch_size=4, image_size=image
    )
    text_width = 2 * (head_dim + 1)
    text = CLIPTextCfg(
        context_length=7,
        vocab_size=vocab,
        width=text_width,
        heads=2,
        layers=depth,
        mlp_ratio=(mlp_hidden + 3) / text_width,
    )
    return DualEncoderUnderTest(CLIP(embed_dim=12, vision_cfg=vision, text_cfg=text), vocab)


def _token_batch(n: int, vocab: int, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask derived from the batch size (fixed per n), with padding."""
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(3, vocab - 1, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    attention = (torch.arange(length) < lengths[:, None]).long()
    return ids * attention, attention


def _blip_configs(heads: int, head_dim: int, depth: int, mlp_hidden: int, image: int, vocab: int = 50):
    """BLIP vision and text configs: the text has another head count, head_dim and MLP width than the vision, and its
    cross-attention reads the vision width."""
    from transformers.models.blip.configuration_blip import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_hidden_layers=depth,
        intermediate_size=mlp_hidden,
        image_size=image,
        patch_size=4,
        initializer_range=0.02,  # HF's default 1e-10 would make every vision output nearly the same
    )
    text = BlipTextConfig(
        vocab_size=vocab,
        hidden_size=2 * (head_dim + 1),
        num_attention_heads=2,
        num_hidden_layers=depth,
        intermediate_size=mlp_hidden + 3,
        encoder_hidden_size=heads * head_dim,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=vocab - 1,
        sep_token_id=vocab - 1,
    )
    return vision, text


class TokensUnderTest(nn.Module):
    """A model that reads text too, called as ``model(images)``: token ids and a mask derived from the batch size are
    handed with the images to ``call(inner, images, ids, attention)``. The wrapped model is the child ``inner``."""

    def __init__(self, inner: nn.Module, vocab: int, call) -> None:
        super().__init__()
        self.inner, self.vocab, self.call = inner, vocab, call

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ids, attention = _token_batch(images.shape[0], self.vocab)
        return self.call(self.inner, images, ids, attention)


def _blip_itm_and_itc(blip, images, ids, attention) -> torch.Tensor:
    """HF BlipForImageTextRetrieval: the ITM logits (text cross-attending to the image) and the batch's ITC
    similarities, concatenated."""
    itm = blip(input_ids=ids, pixel_values=images, attention_mask=attention, use_itm_head=True).itm_score
    itc = blip(input_ids=ids, pixel_values=images, attention_mask=attention, use_itm_head=False).itm_score
    return torch.cat([itm, itc], dim=-1)


def hf_blip_retrieval(
    heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16
) -> nn.Module:
    from transformers import BlipConfig, BlipForImageTextRetrieval

    vision, text = _blip_configs(heads, head_dim, depth, mlp_hidden, image)
    config = BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_text_hidden_size=12)
    return TokensUnderTest(BlipForImageTextRetrieval(config), 50, _blip_itm_and_itc)


def hf_bert(heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_hidden_layers=depth,
        intermediate_size=mlp_hidden,
        max_position_embeddings=16,
    )

    def call(bert, images, ids, attention):
        return bert(input_ids=ids, attention_mask=attention).last_hidden_state.flatten(1)

    return TokensUnderTest(BertModel(config, add_pooling_layer=False), 50, call)


def blip_nlvr(heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16) -> nn.Module:
    from upop.models.blip.modeling import BlipNlvr

    vision, text = _blip_configs(heads, head_dim, depth, mlp_hidden, image)

    def call(nlvr, images, ids, attention):  # each image paired with the batch's images in reverse order
        return nlvr(torch.stack([images, images.flip(0)], dim=1), ids, attention)

    return TokensUnderTest(BlipNlvr(vision, text, enc_token_id=2), 50, call)


def hf_blip_caption(
    heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16
) -> nn.Module:
    """HF BlipForConditionalGeneration: the decoder's logits (causal self-attention, cross-attention to the image)."""
    from upop.models.blip.modeling import build_captioner

    vision, text = _blip_configs(heads, head_dim, depth, mlp_hidden, image)

    def call(captioner, images, ids, attention):
        return captioner(pixel_values=images, input_ids=ids, attention_mask=attention).logits.flatten(1)

    return TokensUnderTest(build_captioner(vision, text), 50, call)


def blip_vqa(heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16) -> nn.Module:
    """UPop's BLIP VQA: the answer decoder's logits through the question encoder (each question answered with the
    batch's questions in reverse order as answers)."""
    from upop.models.blip.modeling import BlipVqa

    vision, text = _blip_configs(heads, head_dim, depth, mlp_hidden, image)

    def call(vqa, images, ids, attention):
        return vqa(images, ids, attention, ids.flip(0), attention.flip(0)).flatten(1)

    return TokensUnderTest(BlipVqa(vision, text, enc_token_id=2), 50, call)


def _segmenter(decoder: str, heads: int, head_dim: int, depth: int, mlp_hidden: int, image: int) -> nn.Module:
    from upop.models.segmenter.modeling import build_segmenter

    dim = heads * head_dim
    dec = {"name": decoder, "n_layers": depth, "n_heads": heads, "d_ff": mlp_hidden + 3}
    net = dict(image_size=image, patch_size=4, d_model=dim, n_heads=heads, n_layers=depth, d_ff=mlp_hidden, n_cls=5)
    return build_segmenter({**net, "decoder": dec})


def segmenter_mask(heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16):
    """UPop's Segmenter with the mask-transformer decoder (class embeddings through the decoder blocks)."""
    return _segmenter("mask_transformer", heads, head_dim, depth, mlp_hidden, image)


def segmenter_linear(heads: int = 3, head_dim: int = 7, depth: int = 2, mlp_hidden: int = 19, image: int = 16):
    """UPop's Segmenter with the linear decoder."""
    return _segmenter("linear", heads, head_dim, depth, mlp_hidden, image)


# adapter name -> model factories (each takes heads, head_dim, depth, mlp_hidden, image). A model holding blocks of
# several families (BLIP) is listed under each family it tests.
ADAPTER_MODELS = {
    "timm-vit": [timm_vit],
    "hf-vit": [hf_vit, hf_deit],
    "hf-clip": [hf_clip],
    "open-clip": [open_clip_model],
    "hf-bert": [hf_bert, hf_blip_caption, blip_vqa],
    "hf-blip": [hf_blip_retrieval],
    "blip-nlvr": [blip_nlvr],
    "segmenter": [segmenter_mask, segmenter_linear],
}

# (heads, head_dim, depth, mlp_hidden): odd head dims, one head, odd widths
SIZES = [(3, 7, 2, 19), (1, 5, 1, 8), (5, 3, 2, 33), (2, 8, 3, 16)]

CASES = [(name, f, size) for name, fs in ADAPTER_MODELS.items() for f in fs for size in SIZES]
CASE_IDS = [f"{f.__name__}-h{s[0]}d{s[1]}L{s[2]}m{s[3]}" for _, f, s in CASES]


def build(factory, size, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    heads, head_dim, depth, mlp = size
    return factory(heads=heads, head_dim=head_dim, depth=depth, mlp_hidden=mlp).eval()


def images(n: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def every_adapter_has_models() -> set[str]:
    return set(registered_adapters()) - set(ADAPTER_MODELS)


# the paper's element-wise granularity, for tests of the ranking's arithmetic (the default "auto" is measured)
ELEMENTWISE = {"align_attn": 1, "align_mlp": 1}

# CLI runs on a small slice of the built-in data; a later repetition of a flag overrides (argparse keeps the last)
CLI_DATA = "--model vit-micro --train-size 256 --val-size 64 --batch-size 16".split()


def compress_argv(pretrained, out, *extra: str) -> list[str]:
    """`upop compress` of the built-in vit-micro (from ``pretrained``, or random weights when None) for one search
    and one retraining epoch; ``extra`` flags override (e.g. "--epochs", "0")."""
    return [
        "compress",
        *CLI_DATA,
        *(["--pretrained", str(pretrained)] if pretrained is not None else []),
        *"--epochs-search 1 --epochs 1".split(),
        *extra,
        "--output-dir",
        str(out),
    ]


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (they are not a package), for tests that keep them from rotting."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def blip_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our BLIP keys (BlipNlvr, BlipRetrieval, BlipVqa, the captioner) written back in the released BLIP checkpoint's
    names (written here by hand, independently of the project's table), with the momentum-free extras a release
    holds."""
    out = {}
    for key, value in state.items():
        k = key
        k = k.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
        k = k.replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
        k = k.replace("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj.")
        k = k.replace("vision_model.encoder.layers.", "visual_encoder.blocks.")
        k = k.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
        k = k.replace(".self_attn.qkv.", ".attn.qkv.").replace(".self_attn.projection.", ".attn.proj.")
        k = k.replace("vision_model.post_layernorm.", "visual_encoder.norm.")
        for i in (0, 1):
            k = k.replace(f"crossattention.branches.{i}.self.", f"crossattention.self{i}.")
            k = k.replace(f"crossattention.branches.{i}.dense.", f"crossattention.output.dense{i}.")
        k = k.replace("crossattention.merge_layer.", "crossattention.output.merge_layer.")
        k = k.replace("crossattention.LayerNorm.", "crossattention.output.LayerNorm.")
        out[k] = value
    out["text_encoder.embeddings.position_ids"] = torch.arange(16)[None]
    return out


def blip_decoder_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blip_original_layout`` for the models with a text decoder (captioning, VQA): the tied LM head stored once,
    and the momentum decoder's keys a release holds."""
    out = blip_original_layout(state)
    out.pop("text_encoder.embeddings.position_ids")
    for tied in ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"):
        out.pop(tied)  # a release may store the tied LM head once
    out["text_decoder_m.cls.predictions.bias"] = torch.zeros(3)  # the momentum decoder, not used
    return out


SEGMENTER_VARIANT = """\
net_kwargs:
  backbone: deit_tiny_distilled_patch16_224
  d_model: 32
  decoder:
    drop_path_rate: 0.0
    dropout: 0.1
    n_layers: 2
    name: mask_transformer
  distilled: true
  drop_path_rate: 0.1
  dropout: 0.0
  image_size: !!python/tuple
  - 32
  - 32
  n_cls: 150
  n_heads: 2
  n_layers: 2
  normalization: deit
  patch_size: 8
dataset_kwargs:
  crop_size: 32
"""


def ade_folder(root, sizes=None, bad=None):
    """A tiny ADE20K folder: 6 training and 3 validation images with labels 0..3 (0 ignored)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("training", 6), ("validation", 3)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = (20, 28) if i % 2 else (24, 24)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.jpg")
            labels = np.zeros((h, w), dtype=np.uint8)
            labels[: h // 2] = 1 + i % 3
            labels[h // 2 :, : w // 2] = 2
            Image.fromarray(labels, mode="L").save(root / "annotations" / split / f"{i}.png")
    return root


def hf_clip_directory(path):
    """A local HF CLIPModel directory with a tokenizer (a word-level tokenizers.json over the built-in vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    from upop.data.captions import VOCAB

    eos = len(VOCAB) - 1
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", model_max_length=16
    )
    text = dict(
        vocab_size=len(VOCAB),
        hidden_size=24,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=40,
        max_position_embeddings=16,
        eos_token_id=eos,
        pad_token_id=0,
        bos_token_id=1,
    )
    vision = dict(hidden_size=30, num_attention_heads=3, num_hidden_layers=2, intermediate_size=50, image_size=16)
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=dict(text), vision_config=dict(vision, patch_size=4), projection_dim=16)
    ).save_pretrained(path)
    fast.save_pretrained(path)


def released_segmenter(folder: Path) -> dict[str, torch.Tensor]:
    """A released Segmenter's folder in its format (``variant.yml`` of ``SEGMENTER_VARIANT``, ``checkpoint.pth``
    nesting the weights under "model"), 150 classes as ADE20K's; returns its state dict."""
    from upop.models.segmenter.modeling import build_segmenter

    folder.mkdir(parents=True)
    (folder / "variant.yml").write_text(SEGMENTER_VARIANT)
    net = dict(image_size=32, patch_size=8, d_model=32, n_heads=2, n_layers=2, n_cls=150, distilled=True)
    torch.manual_seed(0)
    state = build_segmenter({**net, "decoder": {"name": "mask_transformer", "n_layers": 2}}).state_dict()
    torch.save({"model": state}, folder / "checkpoint.pth")
    return state


def run_log(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds", None)  # wall time is the one thing allowed to differ
    return records


def assert_same_result(a: Path, b: Path) -> None:
    plan_a, plan_b = (json.loads((d / "plan.json").read_text()) for d in (a, b))
    assert plan_a["structures"] == plan_b["structures"]
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not (wa[k].shape == wb[k].shape and wa[k].eq(wb[k]).all())]
    assert not different, f"weights differ: {different[:5]}"
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for key in ("searched_metrics", "kept", "pruned_cost_fraction", "per_structure"):
        assert ra[key] == rb[key], key
    assert ra["compressed"]["metrics"] == rb["compressed"]["metrics"]
    assert run_log(a) == run_log(b)
    assert not (b / "checkpoints").exists()  # dropped once the run completed
