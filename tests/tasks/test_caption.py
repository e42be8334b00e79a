"""Captioning: generation by HF's generate (KV cache) gives the same token ids from the masked model and the
compressed one (greedy and beam, head-dim and whole-head granularity); the prompt is not scored; pycocoevalcap
scores; the released checkpoints' keys; an HF directory; the CLI end to end with the decoder in the one budget."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import _blip_configs, blip_decoder_original_layout

import upop
from upop.cli import main
from upop.models import build, load_weights
from upop.models.blip.checkpoints import converter
from upop.models.blip.modeling import build_captioner
from upop.tasks.caption import PROMPT, Caption, caption_scores, generate_captions, scorer_tokenizer, simple_tokenize

DATA = "--task caption --model blip-micro --train-size 64 --val-size 16 --batch-size 16".split()


def _captioner(seed=0, depth=2):
    torch.manual_seed(seed)
    vision, text = _blip_configs(2, 8, depth, 24, 16, vocab=50)
    text.max_position_embeddings = 24
    vision.initializer_range = text.initializer_range = 0.25  # else every image gets the same random caption
    return build_captioner(vision, text).eval()


def _generate(model, x, **kw):
    prompt = torch.tensor([[1, 7, 8, 9, 49]]).expand(len(x), -1).clone()  # start, three words, end (dropped by HF)
    settings = {"max_length": 12, "min_length": 8, **kw}
    return model.generate(pixel_values=x, input_ids=prompt, **settings)


def _choice(pruner, seed=0):
    """Half of every structure's elements pruned (True), picked at random (a quarter of a mixed one's pairs kept)."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for s in pruner.structures:
        if s.grid is not None:  # mixed granularity: half the heads x half the dims are kept
            heads, dims = (torch.randperm(n, generator=g)[: max(1, n // 2)] for n in s.grid)
            kept = torch.zeros(s.grid, dtype=torch.bool)
            kept[heads[:, None], dims[None, :]] = True
            chosen.append(~kept.reshape(-1))
            continue
        c = torch.zeros(s.size, dtype=torch.bool)
        c[torch.randperm(s.size, generator=g)[: s.size // 2]] = True
        chosen.append(c)
    return chosen


@pytest.mark.parametrize("granularity", ["dim", "head", "mixed"])
def test_masked_and_compressed_decoders_generate_the_same_tokens_greedy_and_beam(granularity):
    model = _captioner().double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    dense = {beams: _generate(model, x, num_beams=beams) for beams in (1, 3)}
    config = upop.PruneConfig(p=0.5, total_steps=10, granularity=granularity, align_attn=1, align_mlp=1)
    pruner = upop.Pruner(model, config)
    assert any(s.tower == "decoder" for s in pruner.structures)
    for beams in (1, 3):  # masks at 1: the same tokens as the untouched model
        assert torch.equal(_generate(model, x, num_beams=beams), dense[beams])
    pruner.set_choice(_choice(pruner), value=0.0)
    masked = {beams: _generate(model, x, num_beams=beams) for beams in (1, 3)}
    compressed = pruner.compress(force=True)
    layers = compressed.text_decoder.bert.encoder.layer
    widths = [a.self.all_head_size for layer in layers for a in (layer.attention, layer.crossattention)]
    assert sum(widths) < 18 * len(widths)  # the decoder's attention really shrank
    for beams in (1, 3):
        out = _generate(compressed, x, num_beams=beams)
        assert out.shape[1] > 5  # tokens were generated after the prompt
        assert torch.equal(out, masked[beams])
        assert torch.equal(out, _generate(compressed, x, num_beams=beams, use_cache=False))  # the KV cache is right
    assert any(not torch.equal(masked[b], dense[b]) for b in (1, 3))  # pruning changed the model


def test_the_prompt_is_given_not_scored():
    bundle = build("blip-micro", "captioner")
    images = torch.randn(2, 3, 16, 16)
    out = Caption(bundle).outputs(
        bundle.model, (images, ["a red circle", "two objects with a blue square"], torch.arange(2))
    )
    labels = out["labels"]
    assert (labels[:, :4] == -100).all()  # <bos> a picture of
    tokens = bundle.tokenizer(["a picture of a red circle"])["input_ids"][0]
    assert labels[0, 4:8].tolist() == tokens[4:8].tolist()  # a red circle <eos>
    assert (labels[0, 8:] == -100).all()  # padding
    assert out["logits"].shape[:2] == labels.shape


def test_generated_captions_drop_the_prompt():
    bundle = build("blip-micro", "captioner")
    captions = generate_captions(
        bundle.model.eval(), bundle.tokenizer, torch.randn(2, 3, 16, 16), num_beams=1, max_length=9
    )
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert not any(c.startswith(PROMPT.strip()) and len(c.split()) > 8 for c in captions)


def test_pycocoevalcap_scores_a_perfect_caption_higher_than_a_wrong_one():
    refs = {0: ["a red circle left of a blue square", "a large red circle"], 1: ["two objects with a green cross"]}
    perfect = caption_scores(refs, {0: "a red circle left of a blue square", 1: "two objects with a green cross"})
    wrong = caption_scores(refs, {0: "a yellow diamond", 1: "a cyan triangle alone"})
    assert perfect["bleu4"] > 90 and perfect["cider"] > wrong["cider"] + 100
    assert simple_tokenize("A dog, on a Skate-board.") == "a dog on a skate board"


@pytest.mark.skipif(scorer_tokenizer() != "ptb", reason="no Java: the PTB tokenizer cannot run")
def test_the_simple_tokenizer_scores_the_built_in_captions_as_the_ptb_tokenizer_does(monkeypatch):
    import upop.tasks.caption as cap
    from upop.data.captions import scene_captions
    from upop.data.shapes import ShapesWorld

    world = ShapesWorld(20, seed=3)
    refs = {i: scene_captions(world, i) for i in range(20)}
    cands = {i: scene_captions(world, (i + 1) % 20)[i % 5] for i in range(20)}
    ptb = caption_scores(refs, cands)
    monkeypatch.setattr(cap, "scorer_tokenizer", lambda: "simple")
    assert caption_scores(refs, cands) == pytest.approx(ptb)


def test_a_released_blip_caption_checkpoint_loads_through_the_key_map(tmp_path):
    source, target = _captioner(0), _captioner(1)
    original = blip_decoder_original_layout(source.state_dict())
    assert "visual_encoder.blocks.1.attn.qkv.weight" in original
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight" in original
    path = tmp_path / "model_base_caption_capfilt_large.pth"
    torch.save({"model": original}, path)
    load_weights(target, path, converter("captioner"))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_generate(target, x, num_beams=3), _generate(source, x, num_beams=3))


def _hf_caption_dir(path):
    from transformers import BertTokenizer

    model = _captioner(0)
    model.save_pretrained(path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "red", "circle"]
    (path / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(50 - len(words))]) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return model


def test_an_hf_blip_captioning_directory_generates_and_decodes(tmp_path):
    source = _hf_caption_dir(tmp_path)
    bundle = build(f"hf:{tmp_path}", "captioner")
    model = bundle.model.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_generate(model, x), _generate(source, x))
    assert bundle.tokenizer.decode(torch.tensor([2, 6, 9, 10, 3])) == "a red circle"
    captions = generate_captions(model, bundle.tokenizer, x, max_length=10)
    assert len(captions) == 2


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_compresses_a_captioner_with_its_decoder_in_the_budget(tmp_path):
    base, out = tmp_path / "base", tmp_path / "c"
    assert main(["train", *DATA, "--epochs", "1", "--output-dir", str(base)]) == 0
    args = [*DATA, "--pretrained", str(base / "model.safetensors"), "--epochs-search", "1", "--epochs", "1"]
    assert main(["compress", *args, "--p", "0.5", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["kept_by_tower"]) == {"vision", "decoder"}
    assert {"bleu4", "cider"} <= set(report["compressed"]["metrics"])
    assert "tokenizer" in report["splits"]["report"]["scorer"]
    assert abs(report["pruned_cost_fraction"] - 0.5) < 0.01
