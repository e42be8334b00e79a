"""BLIP's released files as a user of the paper holds them: an HF BLIP directory built for another image size (VQA's
480 px from a 384 px directory: position embeddings interpolated as BLIP does), a tokenizer without BLIP's [ENC]
token (added as BLIP adds it, and said), and the released checkpoints' vision layer norms (eps 1e-6, not the 1e-5
of HF's configs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import _blip_configs, blip_decoder_original_layout

from upop.models import build, load_weights

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "colour", "is", "the", "circle", "?", "red"]


def _hf_vqa_dir(path, vocab_words, vocab_size=50, image=16):
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering

    vision, text = _blip_configs(3, 2, 2, 24, image, vocab=vocab_size)  # one width (6) for both towers, as HF's VQA
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict()))
    model.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(vocab_words) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return model


def test_a_directory_of_another_image_size_is_built_at_the_asked_size_with_its_positions_interpolated(tmp_path):
    source = _hf_vqa_dir(tmp_path, [*WORDS, "[ENC]", *(f"w{i}" for i in range(37))])
    bundle = build(f"hf:{tmp_path}", "vqa", image_size=32)
    model = bundle.model
    assert bundle.image_size == 32 and model.vision_config.image_size == 32
    dense = source.state_dict()["vision_model.embeddings.position_embedding"]  # (1, 1 + 4 x 4, 6) at 16 px
    grid = dense[0, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(64, -1)
    got = model.state_dict()["vision_model.embeddings.position_embedding"][0]
    assert torch.equal(got[0], dense[0, 0]) and torch.allclose(got[1:], expected)
    q = bundle.tokenizer(["what colour is the circle?"])
    with torch.no_grad():  # and it runs at 32 px
        model.generate(torch.randn(1, 3, 32, 32), q["input_ids"], q["attention_mask"], max_length=4)


def test_a_tokenizer_without_the_encoder_token_gets_it_as_blip_adds_it_and_says_so(tmp_path):
    words = [*WORDS, "[DEC]", *(f"w{i}" for i in range(36))]  # 48 words, BLIP's [DEC] but no [ENC]
    _hf_vqa_dir(tmp_path, words, vocab_size=50)
    bundle = build(f"hf:{tmp_path}", "vqa")
    assert bundle.model.enc_token_id == len(words)  # the next id, as BLIP's init_tokenizer gives 30523
    assert len(bundle.notes) == 1 and "[ENC]" in bundle.notes[0] and "added" in bundle.notes[0]
    with_enc = [*words[:-1], "[ENC]"]
    _hf_vqa_dir(tmp_path / "with", with_enc, vocab_size=50)
    again = build(f"hf:{tmp_path / 'with'}", "vqa")
    assert again.model.enc_token_id == len(with_enc) - 1 and again.notes == []


def test_a_released_checkpoint_brings_the_vision_layer_norm_eps_of_blip_s_vit(tmp_path):
    source = _hf_vqa_dir(tmp_path, [*WORDS, "[ENC]", *(f"w{i}" for i in range(37))])
    bundle = build(f"hf:{tmp_path}", "vqa")
    norms = [m for m in bundle.model.vision_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == source.config.vision_config.layer_norm_eps for m in norms)  # HF's directory: as is
    released = blip_decoder_original_layout(bundle.model.state_dict())
    torch.save({"model": released}, tmp_path / "model_base_vqa_capfilt_large.pth")
    load_weights(bundle, tmp_path / "model_base_vqa_capfilt_large.pth")
    assert all(m.eps == 1e-6 for m in norms)
    text_norms = [m for m in bundle.model.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(m.eps == source.config.text_config.layer_norm_eps for m in text_norms)  # BERT's stay


def test_every_hf_family_is_built_at_the_asked_image_size_from_its_directory(tmp_path):
    from helpers import hf_clip_directory, hf_vit

    hf_vit(heads=2, head_dim=8, depth=2, mlp_hidden=32, image=16).save_pretrained(tmp_path / "vit")
    vit = build(f"hf:{tmp_path / 'vit'}", "classifier", 5, image_size=32)
    assert vit.image_size == 32 and vit.model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 5)
    hf_clip_directory(tmp_path / "clip")
    clip = build(f"hf:{tmp_path / 'clip'}", "dual_encoder", image_size=32)
    assert clip.image_size == 32
    out = clip.model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32))
    assert out.pooler_output.shape[0] == 1 if hasattr(out, "pooler_output") else out.shape[0] == 1
