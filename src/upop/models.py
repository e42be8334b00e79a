"""Models by name: built-in tiny configs (no download), any timm architecture, or an HF directory; and safe loading
of a state dict from a local file."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upop.errors import UPopError


@dataclass(frozen=True)
class BuiltinViT:
    """A timm VisionTransformer config small enough to train on 2 CPU cores."""

    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    def build(self, num_classes: int, image_size: int | None = None) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=image_size or self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=True,
            num_classes=num_classes,
        )


@dataclass(frozen=True)
class BuiltinCLIP:
    """An HF CLIPModel config small enough to train on 2 CPU cores, with the word-level tokenizer of the built-in
    captions. The two towers have different widths."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_heads: int
    text_width: int
    text_heads: int
    depth: int
    embed_dim: int = 64
    kind: str = "dual_encoder"

    def build(self, num_classes: int, image_size: int | None = None) -> nn.Module:
        from transformers import CLIPConfig, CLIPModel

        from upop.data.captions import WordTokenizer

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
            image_size=image_size or self.image_size,
            patch_size=self.patch_size,
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.embed_dim))
        model.upop_tokenizer = tokenizer
        return model


@dataclass(frozen=True)
class BuiltinBLIP:
    """A BLIP small enough to train on 2 CPU cores (vision and text of one depth and head count), with the word-level
    tokenizer of the built-in captions and statements: ``BlipNlvr`` for NLVR, ``BlipRetrieval`` for retrieval, HF's
    ``BlipForConditionalGeneration`` for captioning and ``BlipVqa`` for VQA (these two with the questions' and
    answers' words too, and 20 positions: BLIP generates up to 20 tokens)."""

    image_size: int
    patch_size: int
    width: int
    heads: int
    depth: int
    text_width: int
    kinds: tuple[str, ...] = ("nlvr", "dual_encoder", "captioner", "vqa")

    def build(self, num_classes: int, image_size: int | None = None, kind: str = "nlvr") -> nn.Module:
        from upop.blip import BlipNlvr, BlipRetrieval, BlipVqa, build_captioner, tiny_configs
        from upop.data.captions import WordTokenizer
        from upop.data.questions import BLIP_GEN_VOCAB
        from upop.data.statements import BLIP_VOCAB

        generative = kind in ("captioner", "vqa")
        tokenizer = WordTokenizer(20, BLIP_GEN_VOCAB) if generative else WordTokenizer(vocab=BLIP_VOCAB)
        vision, text = tiny_configs(
            image_size or self.image_size,
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
        model.upop_tokenizer = tokenizer
        return model


@dataclass(frozen=True)
class BuiltinSegmenter:
    """A Segmenter (``upop.segmenter``: ViT encoder, mask-transformer decoder) small enough to train on 2 CPU cores."""

    image_size: int
    patch_size: int
    width: int
    heads: int
    depth: int
    decoder_depth: int
    kind: str = "segmenter"

    def build(self, num_classes: int, image_size: int | None = None) -> nn.Module:
        from upop.segmenter import build_segmenter

        decoder = {"name": "mask_transformer", "n_layers": self.decoder_depth, "n_heads": self.heads}
        net = dict(
            image_size=image_size or self.image_size,
            patch_size=self.patch_size,
            d_model=self.width,
            n_heads=self.heads,
            n_layers=self.depth,
            n_cls=num_classes,
            decoder=decoder,
        )
        return build_segmenter(net)


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
MODEL_KINDS = {
    "classifier": "an image classifier",
    "dual_encoder": "a dual (image-text) encoder",
    "nlvr": "an NLVR model (two images and a statement)",
    "captioner": "a captioning model (an image encoder and a text decoder)",
    "vqa": "a VQA model (image and question encoders and an answer decoder)",
    "segmenter": "a segmentation model (Segmenter)",
}


def model_names() -> str:
    return ", ".join([*BUILTIN_MODELS, "timm:ARCH", "hf:PATH", "open_clip:ARCH:WEIGHTS", "segmenter:PATH"])


def default_image_size(spec: str) -> int | None:
    """The input size a model spec is built for (None: ask the model after building)."""
    if spec.startswith("segmenter:"):  # a released Segmenter: its variant.yml says
        from upop.segmenter import variant_image_size

        return variant_image_size(Path(spec.partition(":")[2]))
    return BUILTIN_MODELS[spec].image_size if spec in BUILTIN_MODELS else None


def build_model(
    spec: str, num_classes: int, image_size: int | None = None, kind: str = "classifier", weights: bool = True
) -> nn.Module:
    """A dense model with freshly initialised weights (nothing is downloaded), of the ``kind`` the task needs.

    ``spec``: a built-in name (``vit-tiny``, ``clip-tiny``), ``timm:ARCH`` (any timm architecture, e.g.
    ``timm:deit_small_patch16_224``), ``hf:PATH`` (a local HF transformers directory with config.json and weights,
    loaded with from_pretrained; a CLIPModel for dual encoders, with its tokenizer files) or, for dual encoders,
    ``open_clip:ARCH:WEIGHTS`` (an open_clip architecture name or model-config JSON, and a local state dict in
    open_clip/OpenAI format; ``open_clip:ARCH`` alone builds random weights). ``weights=False`` builds the architecture
    of an ``hf:`` or ``open_clip:`` spec without reading its weight files (for loading compressed weights into it)."""
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        kinds = getattr(builtin, "kinds", (getattr(builtin, "kind", "classifier"),))
        if kind not in kinds:
            raise UPopError(f"{spec} is {MODEL_KINDS[kinds[0]]}; this task needs {MODEL_KINDS[kind]}")
        if isinstance(builtin, BuiltinBLIP):
            return builtin.build(num_classes, image_size, kind)
        return builtin.build(num_classes, image_size)
    family, _, arg = spec.partition(":")
    if kind == "segmenter":
        if family == "segmenter" and arg:
            from upop.segmenter import load_segmenter

            return load_segmenter(Path(arg), num_classes, weights)
        raise UPopError(
            f"model {spec!r} is not {MODEL_KINDS[kind]}; accepted: segmenter-tiny, segmenter-micro, segmenter:PATH "
            "(a released checkpoint.pth with its variant.yml)"
        )
    if kind in ("captioner", "vqa"):
        if family == "hf" and arg:
            from upop.blip import load_hf_captioner, load_hf_vqa

            return (load_hf_captioner if kind == "captioner" else load_hf_vqa)(Path(arg), weights)
        raise UPopError(
            f"model {spec!r} is not {MODEL_KINDS[kind]}; accepted: blip-tiny, blip-micro, hf:PATH (an HF BLIP)"
        )
    if kind == "nlvr":
        if family == "hf" and arg:
            from upop.blip import load_hf_nlvr

            return load_hf_nlvr(Path(arg), weights)
        raise UPopError(f"model {spec!r} is not an NLVR model; accepted: blip-tiny, blip-micro, hf:PATH (an HF BLIP)")
    if kind == "dual_encoder":
        if family == "hf" and arg:
            return _load_hf_clip(Path(arg), weights)
        if family == "open_clip" and arg:
            return _load_open_clip(arg, weights)
        raise UPopError(
            f"model {spec!r} is not a retrieval model; accepted: clip-tiny, clip-micro, blip-tiny, blip-micro, "
            "hf:PATH (CLIPModel or BLIP), open_clip:ARCH:WEIGHTS"
        )
    kind, arg = family, arg
    if kind == "timm" and arg:
        import timm

        if arg not in timm.list_models():
            raise UPopError(f"timm has no architecture {arg!r}")
        if image_size:
            try:
                return timm.create_model(arg, pretrained=False, num_classes=num_classes, img_size=image_size)
            except TypeError:
                pass  # a family without a fixed input size (e.g. a CNN): no img_size argument
        return timm.create_model(arg, pretrained=False, num_classes=num_classes)
    if kind == "hf" and arg:
        return _load_hf(Path(arg), num_classes, weights)
    raise UPopError(f"unknown model {spec!r}; accepted: {model_names()}")


def _load_hf(path: Path, num_classes: int, weights: bool = True) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # one line per error on stderr, no loading bars

    if not (path / "config.json").is_file():
        raise UPopError(f"{path} is not an HF model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if getattr(config, "num_labels", None) != num_classes:
        labels = {i: str(i) for i in range(num_classes)}  # a new head for this data set's classes
        kwargs.update(
            num_labels=num_classes,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            ignore_mismatched_sizes=True,
        )
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not (has_weights and weights):
        config_kwargs = {k: v for k, v in kwargs.items() if k in ("num_labels", "id2label", "label2id")}
        for key, value in config_kwargs.items():
            setattr(config, key, value)
        return AutoModelForImageClassification.from_config(config)
    return AutoModelForImageClassification.from_pretrained(str(path), **kwargs)


def _load_hf_clip(path: Path, weights: bool = True) -> nn.Module:
    from transformers import AutoConfig, AutoTokenizer, CLIPModel
    from transformers.utils.logging import disable_progress_bar

    if not (path / "config.json").is_file():
        raise UPopError(f"{path} is not an HF model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type == "blip":
        from upop.blip import load_hf_retrieval

        return load_hf_retrieval(path, weights)
    if config.model_type != "clip":
        raise UPopError(f"{path} holds a {config.model_type!r} model; the retrieval task needs a CLIP or BLIP model")
    try:  # before the weights: a directory without a tokenizer fails fast
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UPopError(f"{path} has no usable tokenizer files ({str(e).splitlines()[0][:120]})") from None
    disable_progress_bar()  # one line per error on stderr, no loading bars
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if has_weights and weights:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
    else:
        model = CLIPModel(config)
    length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), config.text_config.max_position_embeddings)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))

    model.upop_tokenizer = tokenize
    return model


def _load_open_clip(arg: str, load: bool = True) -> nn.Module:
    """``ARCH[:WEIGHTS]``: ARCH an open_clip model name or a model-config JSON file ({"embed_dim", "vision_cfg",
    "text_cfg"}); WEIGHTS a local state dict (open_clip or OpenAI key format), read without executing pickled code."""
    import open_clip

    arch, _, weights = arg.partition(":")
    if arch.endswith(".json"):
        try:
            cfg = json.loads(Path(arch).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UPopError(f"cannot read the open_clip model config {arch}: {e}") from None
        try:
            model = open_clip.model.CLIP(**cfg)
        except TypeError as e:
            raise UPopError(f"{arch} is not an open_clip model config: {e}") from None
        tokenizer = _open_clip_tokenizer(model, arch)
    else:
        if arch not in open_clip.list_models():
            raise UPopError(f"open_clip has no architecture {arch!r} (give a name from open_clip.list_models())")
        model = open_clip.create_model(arch, pretrained=None)
        tokenizer = open_clip.get_tokenizer(arch)
    if weights and load:
        load_weights(model, weights)
    model.upop_tokenizer = tokenizer
    return model


def _open_clip_tokenizer(model: nn.Module, arch: str) -> Any:
    """The tokenizer of a CLIP built from a config file: open_clip's BPE tokenizer for its vocabulary size, the
    built-in word tokenizer for the shapes-world vocabulary (e.g. a tiny open_clip trained on the built-in data)."""
    from open_clip.tokenizer import SimpleTokenizer

    from upop.data.captions import VOCAB, WordTokenizer

    vocab, context = model.vocab_size, model.context_length
    if vocab == len(VOCAB):
        return WordTokenizer(context_length=context)
    bpe = SimpleTokenizer(context_length=context)
    if vocab < len(bpe.encoder):
        raise UPopError(
            f"{arch}: a text vocabulary of {vocab} fits neither open_clip's tokenizer ({len(bpe.encoder)} tokens) "
            f"nor the built-in captions' ({len(VOCAB)} words)"
        )
    return bpe


def model_image_size(model: nn.Module) -> int:
    """The square input size a built model expects."""
    if getattr(model, "upop_image_size", None):
        return int(model.upop_image_size)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        return int(pe.img_size[0])
    visual = getattr(model, "visual", None)  # open_clip
    if visual is not None and getattr(visual, "image_size", None):
        size = visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    config = getattr(model, "config", model)
    config = getattr(config, "vision_config", config)  # CLIP, BLIP: the vision tower's
    if config is not None and getattr(config, "image_size", None):
        size = config.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    raise UPopError(f"cannot tell the input size of a {type(model).__name__}; pass --image-size")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file without executing pickled code: safetensors, or torch.load with
    weights_only=True. Release checkpoints that nest the weights under "model" or "state_dict" are unwrapped, and a
    DDP "module." prefix is stripped."""
    path = Path(path)
    if not path.is_file():
        raise UPopError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing a file
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad header, pickled objects refused by weights_only...
        raise UPopError(
            f"checkpoint {path} is not a readable state dict: {_why_unreadable(path, e)}; UPop reads tensors only "
            "(.safetensors, or a torch file holding a plain state dict, read with weights_only=True; pickled code is "
            "never executed)"
        ) from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UPopError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _why_unreadable(path: Path, error: Exception) -> str:
    """What a file that neither safetensors nor ``torch.load(weights_only=True)`` could read is, from its first
    bytes (torch's own message is long, multi-line and colour-coded)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    if path.suffix == ".safetensors":
        return "its safetensors header is missing or damaged (truncated?)"
    if head.startswith(b"PK\x03\x04"):  # torch's zip format
        if "weights_only" in str(error) or "Unsupported global" in str(error) or "Unsupported operand" in str(error):
            return "it holds pickled Python objects besides tensors"
        return "the torch file is truncated or damaged"
    if head[:1] == b"\x80":  # a bare pickle stream (torch's legacy format or pickle.dump)
        return "it is a pickle of Python objects, not a state dict of tensors"
    return "it is neither a safetensors file nor a torch checkpoint"


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``model``, strictly; a mismatch names the first differing keys."""
    state = read_state_dict(path)
    convert = getattr(model, "upop_convert_state", None)
    if convert is not None:  # a model that also reads another layout (e.g. the released BLIP checkpoints)
        state = convert(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} ({'x'.join(map(str, state[k].shape))} vs {'x'.join(map(str, own[k].shape))})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if shapes:
            parts.append(f"wrong shape {', '.join(shapes[:3])}")
        raise UPopError(f"checkpoint {path} is not a state dict of this {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state)
