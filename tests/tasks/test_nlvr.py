"""NLVR: the built-in statements (balanced, true to the scenes, needing both images), BLIP's NLVR2 annotation
format and its bad entries, the released-checkpoint key map, an HF BLIP directory as the starting point, and the CLI
end to end with vision, text and cross-attention in one budget."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import _blip_configs, blip_original_layout
from PIL import Image

from upop.cli import main
from upop.data.nlvr2 import read_nlvr
from upop.data.shapes import COLOUR_NAMES
from upop.data.statements import statement_pairs
from upop.errors import UPopError
from upop.models import build, build_model, load_weights
from upop.models.blip.checkpoints import converter
from upop.models.blip.modeling import BlipNlvr

DATA = "--task nlvr --model blip-micro --train-size 96 --val-size 32 --batch-size 16".split()


def _visible_objects(world, seg, i):
    """The objects of scene i of which at least 4 pixels show, from the segmentation map."""
    return [o for k, o in enumerate(world.objects(i)) if int((seg[i] == k + 1).sum()) >= 4]


def test_statements_are_balanced_true_to_the_scenes_and_need_both_images():
    world, _, _, pairs, sentences, labels = statement_pairs(2000, seed=4, image_size=32)
    assert abs(labels.float().mean().item() - 0.5) < 0.04
    again = statement_pairs(2000, seed=4, image_size=32)
    assert sentences == again[4] and torch.equal(labels, again[5])  # deterministic
    _, seg = world.render(torch.arange(world.n))
    templates, shows_left = [], []
    for (left, right), sentence, label in zip(pairs.tolist(), sentences, labels.tolist()):
        colour = sentence.split()[-2]
        assert colour in COLOUR_NAMES and left != right
        in_left, in_right = (any(o.colour == colour for o in _visible_objects(world, seg, i)) for i in (left, right))
        assert in_left or in_right  # the named colour is always in the pair
        truth = (in_left and in_right) if sentence.startswith("both") else in_left != in_right
        assert truth == bool(label), sentence
        templates.append(0 if sentence.startswith("both") else 1)
        shows_left.append(in_left)
    templates, shows_left = torch.tensor(templates), torch.tensor(shows_left)
    for t in (0, 1):
        assert set(labels[templates == t].tolist()) == {0, 1}
    # the best rule reading the left image only (majority label per template and whether it shows the colour)
    correct = 0
    for t in (0, 1):
        for shown in (False, True):
            group = labels[(templates == t) & (shows_left == shown)]
            correct += max(int(group.sum()), int(group.numel() - group.sum()))
    assert 0.70 < correct / len(labels) < 0.80


def _nlvr_folder(root, entries_by_split):
    Image.new("RGB", (20, 20), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (20, 20), (30, 30, 200)).save(root / "b.png")
    for split, entries in entries_by_split.items():
        (root / f"nlvr_{split}.json").write_text(json.dumps(entries))


GOOD = [  # as BLIP's nlvr_{train,dev,test}.json write them
    {"images": ["a.png", "b.png"], "sentence": "both images contain a red object", "label": "False"},
    {"images": ["a.png", "a.png"], "sentence": "both images contain a red object", "label": "True"},
]


def test_reader_of_the_nlvr2_format():
    pairs, sentences, labels = read_nlvr_from(GOOD)
    assert pairs == [("a.png", "b.png"), ("a.png", "a.png")] and labels.tolist() == [0, 1]
    singular = [{"image": e["images"], "sentence": e["sentence"], "label": e["label"]} for e in GOOD]
    assert read_nlvr_from(singular)[0] == pairs  # the key some copies of the files use


def read_nlvr_from(entries, tmp=None):
    import pathlib
    import tempfile

    d = pathlib.Path(tempfile.mkdtemp())
    (d / "x.json").write_text(json.dumps(entries))
    return read_nlvr(d / "x.json")


@pytest.mark.parametrize(
    "entry,why",
    [
        ({"images": ["a.png"], "sentence": "s", "label": "True"}, "entry 1: 'images' must be a list of two image"),
        ({"images": ["a.png", "b.png"], "sentence": "s"}, 'entry 1: \'label\' must be "True" or "False"'),
        ({"images": ["a.png", "b.png"], "sentence": "", "label": "True"}, "entry 1: 'sentence' must be a non-empty"),
    ],
)
def test_bad_nlvr_entries_are_named_by_index_on_one_line(entry, why, tmp_path, capsys):
    _nlvr_folder(tmp_path, {"train": [GOOD[0], entry], "dev": GOOD, "test": GOOD})
    out = tmp_path / "out"
    argv = ["train", *DATA, "--data", str(tmp_path), "--epochs", "1", "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err and "nlvr_train.json" in err
    assert not out.exists()


def test_a_missing_split_file_is_named(tmp_path, capsys):
    _nlvr_folder(tmp_path, {"train": GOOD, "dev": GOOD})
    out = tmp_path / "out"
    assert main(["train", *DATA, "--data", str(tmp_path), "--epochs", "1", "--output-dir", str(out)]) == 2
    assert "*test.json" in capsys.readouterr().err


def _tiny_nlvr(seed=0, depth=2):
    torch.manual_seed(seed)
    vision, text = _blip_configs(2, 8, depth, 24, 16, vocab=48)
    return BlipNlvr(vision, text, enc_token_id=2).eval()


def test_a_released_blip_nlvr_checkpoint_loads_through_the_key_map(tmp_path):
    source, target = _tiny_nlvr(0), _tiny_nlvr(1)
    original = blip_original_layout(source.state_dict())
    assert any(k.startswith("visual_encoder.blocks.0.attn.qkv") for k in original)
    assert any(".crossattention.self1.query." in k for k in original)
    path = tmp_path / "model_base_nlvr.pth"
    torch.save({"model": original, "epoch": 3}, path)
    load_weights(target, path, converter("nlvr"))
    x, ids = torch.randn(3, 2, 3, 16, 16), torch.randint(3, 47, (3, 7))
    assert torch.equal(target(x, ids), source(x, ids))


def test_a_blip_checkpoint_of_another_architecture_names_the_mismatching_keys(tmp_path):
    path = tmp_path / "model_base_nlvr.pth"
    torch.save({"model": blip_original_layout(_tiny_nlvr(0, depth=3).state_dict())}, path)
    with pytest.raises(UPopError, match="unexpected .*layer\\.2|layers\\.2"):
        load_weights(_tiny_nlvr(1, depth=2), path, converter("nlvr"))


def _hf_blip_dir(path):
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    vision, text = _blip_configs(2, 8, 2, 24, 16, vocab=48)
    torch.manual_seed(0)
    blip = BlipForImageTextRetrieval(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict()))
    blip.save_pretrained(path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[ENC]", "both", "images", "contain", "a", "red", "object"]
    (path / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(48 - len(words))]) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return blip


def test_an_hf_blip_directory_starts_nlvr_with_its_cross_attention_in_both_branches(tmp_path):
    blip = _hf_blip_dir(tmp_path)
    bundle = build(f"hf:{tmp_path}", "nlvr", 2)
    model = bundle.model
    hf = blip.state_dict()
    own = model.state_dict()
    assert torch.equal(
        own["vision_model.encoder.layers.1.self_attn.qkv.weight"],
        hf["vision_model.encoder.layers.1.self_attn.qkv.weight"],
    )
    for i in (0, 1):
        assert torch.equal(
            own[f"text_encoder.encoder.layer.0.crossattention.branches.{i}.self.key.weight"],
            hf["text_encoder.encoder.layer.0.crossattention.self.key.weight"],
        )
    assert model.enc_token_id == 5
    tokens = bundle.tokenizer(["both images contain a red object"])
    assert model(torch.randn(1, 2, 3, 16, 16), **tokens).shape == (1, 2)


def test_an_hf_blip_directory_without_tokenizer_files_is_refused(tmp_path):
    _hf_blip_dir(tmp_path)
    for f in tmp_path.glob("*"):
        if "token" in f.name or f.name.startswith(("vocab", "special")):
            f.unlink()
    with pytest.raises(UPopError, match="no usable tokenizer"):
        build_model(f"hf:{tmp_path}", 2, kind="nlvr")


@pytest.mark.e2e
def test_cli_compresses_vision_text_and_cross_attention_in_one_budget(tmp_path):
    base, out = tmp_path / "base", tmp_path / "c"
    assert main(["train", *DATA, "--epochs", "1", "--output-dir", str(base)]) == 0
    argv = [
        "compress",
        *DATA,
        "--pretrained",
        str(base / "model.safetensors"),
        "--p",
        "0.5",
        "--epochs-search",
        "1",
        "--epochs",
        "1",
        "--align-attn",
        "1",
        "--align-mlp",
        "1",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["adapter"].split("+")) == {"hf-blip", "hf-bert", "blip-nlvr"}
    towers = {s["tower"] for s in plan["structures"]}
    assert towers == {"vision", "text", "cross"}
    assert sum(s["name"].endswith(("branches.0", "branches.1")) for s in plan["structures"]) == 2 * 2
    assert "accuracy" in json.dumps(report)
    assert main(["evaluate", "--compressed", str(out)]) == 0
