"""Retrieval: the Karpathy-protocol recall against a matrix worked out by hand, the annotation reader, the built-in
captions, and the CLI end to end (HF CLIP and open_clip) with every bad input as one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import hf_clip_directory
from PIL import Image
from safetensors.torch import save_file

from upop.cli import main
from upop.data.captions import CAPTIONS_PER_SCENE, VOCAB, WordTokenizer, relation, scene_captions
from upop.data.config import DataConfig
from upop.data.karpathy import read_karpathy
from upop.data.shapes import SceneObject, ShapesWorld
from upop.errors import UPopError
from upop.tasks import get_task
from upop.tasks.retrieval import recall_at_k

DATA = "--train-size 128 --val-size 32 --batch-size 32".split()


def test_recall_on_a_matrix_worked_out_by_hand():
    # 3 images; captions 0, 1 belong to image 0, caption 2 to image 1, captions 3, 4 to image 2
    sims = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.3, 0.2],  # image 0: best own caption 0.9, nothing higher -> rank 0
            [0.5, 0.2, 0.4, 0.6, 0.7],  # image 1: own 0.4; 0.5, 0.6, 0.7 higher -> rank 3
            [0.1, 0.3, 0.2, 0.05, 0.25],  # image 2: best own 0.25; 0.3 higher -> rank 1
        ]
    )
    # captions: 0 -> rank 0; 1 (0.1 < 0.2, 0.3) -> 2; 2 (0.4 < 0.8) -> 1; 3 (0.05 < 0.3, 0.6) -> 2; 4 -> 1
    got = recall_at_k(sims, torch.tensor([0, 0, 1, 2, 2]), ks=(1, 2))
    expected = {"i2t_r1": 100 / 3, "i2t_r2": 200 / 3, "t2i_r1": 20.0, "t2i_r2": 60.0}
    assert got.keys() == {*expected, "r_mean"}
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)
    assert got["r_mean"] == pytest.approx(sum(expected.values()) / 4)


def test_recall_in_blocks_equals_a_plain_computation_past_the_block_sizes():
    g = torch.Generator().manual_seed(0)
    n_img, per = 1100, 4  # 4400 captions: more than one block both ways
    sims = torch.randn(n_img, n_img * per, generator=g)
    txt2img = torch.arange(n_img).repeat_interleave(per)[torch.randperm(n_img * per, generator=g)]
    got = recall_at_k(sims, txt2img)
    own = sims[txt2img, torch.arange(n_img * per)]
    i2t = torch.stack([(sims[i] > own[txt2img == i].max()).sum() for i in range(n_img)])
    t2i = (sims > own[None]).sum(0)
    for k in (1, 5, 10):
        assert got[f"i2t_r{k}"] == pytest.approx(100 * (i2t < k).float().mean().item())
        assert got[f"t2i_r{k}"] == pytest.approx(100 * (t2i < k).float().mean().item())


def test_captions_name_attributes_and_relations_and_tokenize():
    world = ShapesWorld(50, seed=3)
    captions = [scene_captions(world, i) for i in range(50)]
    assert all(len(c) == CAPTIONS_PER_SCENE for c in captions)
    assert captions == [scene_captions(world, i) for i in range(50)]  # deterministic
    flat = [c for cs in captions for c in cs]
    assert any(" left of " in c for c in flat) and any(" above " in c for c in flat)
    assert len(set(flat)) > 150  # many distinct captions
    a, b = SceneObject("circle", "red", "large", 0.2, 0.5), SceneObject("square", "blue", "small", 0.7, 0.55)
    assert relation(a, b) == "left of" and relation(b, a) == "right of"
    tokens = WordTokenizer()(flat)
    assert tokens["input_ids"].max() < len(VOCAB)
    eos = len(VOCAB) - 1  # the highest id
    assert (tokens["input_ids"] == eos).sum(1).eq(1).all() and tokens["input_ids"].argmax(1).gt(0).all()
    with pytest.raises(ValueError, match="'zebra'"):
        WordTokenizer()(["a zebra"])


def _karpathy(root, n_images=3, train_caption=str):
    (root / "img").mkdir(parents=True)
    for i in range(n_images):
        Image.new("RGB", (20 + i, 18), (40 * i, 100, 200)).save(root / "img" / f"{i}.png")
    train = [{"image": f"img/{i}.png", "caption": f"caption {i} {j}"} for i in range(n_images) for j in range(2)]
    val = [{"image": f"img/{i}.png", "caption": [f"a {i}", f"b {i}", f"c {i}"]} for i in range(n_images)]
    test = [{"image": f"img/{i}.png", "caption": [f"d {i}", f"e {i}"]} for i in range(n_images - 1)]
    (root / "coco_karpathy_train.json").write_text(json.dumps(train))
    (root / "coco_karpathy_val.json").write_text(json.dumps(val))
    (root / "coco_karpathy_test.json").write_text(json.dumps(test))


def test_karpathy_reader_on_a_fixture(tmp_path):
    _karpathy(tmp_path)
    paths, captions, owner = read_karpathy(tmp_path / "coco_karpathy_val.json")
    assert paths == ["img/0.png", "img/1.png", "img/2.png"]
    assert captions[:3] == ["a 0", "b 0", "c 0"] and owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    splits = get_task("retrieval").datasets(DataConfig(root=str(tmp_path), image_size=16))
    assert len(splits.train) == 6 and len(splits.select) == 3 and len(splits.select.captions) == 9
    assert len(splits.report) == 2 and splits.report.captions[:2] == ["d 0", "e 0"]  # test.json reports
    assert splits.about["select"]["source"].endswith("coco_karpathy_val.json")
    assert splits.about["report"]["source"].endswith("coco_karpathy_test.json")
    image, caption, image_id = splits.train[3]
    assert image.shape == (3, 16, 16) and caption == "caption 1 1" and image_id == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"image": "x"}), "must be a non-empty JSON list"),
        (json.dumps([{"image": "img/0.png", "caption": 3}]), "entry 0: expected"),
        (json.dumps([{"caption": "a"}]), "entry 0: expected"),
    ],
)
def test_malformed_annotation_files_are_named(tmp_path, content, message):
    _karpathy(tmp_path)
    (tmp_path / "coco_karpathy_val.json").write_text(content)
    with pytest.raises(UPopError, match=message):
        get_task("retrieval").datasets(DataConfig(root=str(tmp_path), image_size=16))


def _one_line_failure(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("upop: error: "), err
    return err[0]


def test_missing_image_and_missing_annotation_are_one_line(tmp_path, capsys):
    _karpathy(tmp_path / "data")
    (tmp_path / "data" / "img" / "1.png").unlink()
    argv = ["train", "--task", "retrieval", "--model", "clip-micro", "--data", str(tmp_path / "data")]
    err = _one_line_failure(capsys, [*argv, "--output-dir", str(tmp_path / "out")])
    assert "1 image(s) named in" in err and "img/1.png" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "data" / "coco_karpathy_train.json").unlink()
    assert "no *train.json annotation file" in _one_line_failure(capsys, [*argv, "--output-dir", str(tmp_path / "o")])


def test_classifier_for_retrieval_is_refused(tmp_path, capsys):
    argv = ["train", "--task", "retrieval", "--model", "vit-micro", *DATA, "--output-dir", str(tmp_path / "o")]
    assert "vit-micro is an image classifier; this task needs a dual (image-text) encoder" in _one_line_failure(
        capsys, argv
    )


@pytest.mark.e2e
def test_cli_retrieval_train_compress_evaluate_with_the_builtin_clip(tmp_path, capsys):
    base, out = tmp_path / "base", tmp_path / "2x"
    common = ["--task", "retrieval", "--model", "clip-micro", *DATA]
    assert main(["train", *common, "--epochs", "1", "--output-dir", str(base)]) == 0
    argv = ["compress", *common, "--pretrained", str(base / "model.safetensors")]
    assert main([*argv, "--epochs-search", "1", "--epochs", "1", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kept vision attention dims" in text and "kept text MLP neurons" in text
    report = json.loads((out / "report.json").read_text())
    assert set(report["kept_by_tower"]) == {"vision", "text"}
    assert {s["tower"] for s in report["per_structure"]} == {"vision", "text"}
    elementwise = report["alignment"]["attn"] == report["alignment"]["mlp"] == 1  # "auto", measured on this CPU
    assert abs(report["pruned_cost_fraction"] - 0.5) <= (0.01 if elementwise else 0.05)
    assert (out / "kept.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", "--compressed", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metrics"] == pytest.approx(report["compressed"]["metrics"])


@pytest.mark.e2e
def test_cli_open_clip_from_a_config_and_weights_and_a_checkpoint_of_another_architecture(tmp_path, capsys):
    from open_clip.model import CLIP

    cfg = {  # towers of different widths; the text vocabulary of the built-in captions
        "embed_dim": 12,
        "vision_cfg": {"layers": 2, "width": 16, "head_width": 8, "mlp_ratio": 2.0, "patch_size": 4, "image_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": len(VOCAB), "width": 18, "heads": 2, "layers": 2},
    }
    model = CLIP(**cfg)
    (tmp_path / "arch.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    other = dict(cfg, vision_cfg=dict(cfg["vision_cfg"], width=24, head_width=8))
    (tmp_path / "other.json").write_text(json.dumps(other))
    common = ["--task", "retrieval", *DATA, "--epochs-search", "1", "--epochs", "0"]
    spec = f"open_clip:{tmp_path / 'other.json'}:{tmp_path / 'w.safetensors'}"
    err = _one_line_failure(capsys, ["compress", *common, "--model", spec, "--output-dir", str(tmp_path / "x")])
    assert "is not a state dict of this CLIP" in err and "wrong shape" in err
    spec = f"open_clip:{tmp_path / 'arch.json'}:{tmp_path / 'w.safetensors'}"
    assert main(["compress", *common, "--model", spec, "--output-dir", str(tmp_path / "oc")]) == 0
    plan = json.loads((tmp_path / "oc" / "plan.json").read_text())
    assert plan["adapter"] == "open-clip"
    assert {s["tower"] for s in plan["structures"]} == {"vision", "text"}


@pytest.mark.e2e
def test_cli_hf_clip_directory_through_compress_and_evaluate(tmp_path, capsys):
    hf_clip_directory(tmp_path / "clip")
    out = tmp_path / "out"
    common = ["--task", "retrieval", "--model", f"hf:{tmp_path / 'clip'}", *DATA]
    argv = ["compress", *common, "--epochs-search", "1", "--epochs", "1", "--towers", "vision"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    capsys.readouterr()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["adapter"] == "hf-clip" and {s["tower"] for s in plan["structures"]} == {"vision"}
    assert main(["evaluate", "--compressed", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(report["compressed"]["metrics"])
    (tmp_path / "clip" / "tokenizer.json").unlink()
    err = _one_line_failure(capsys, [*argv, "--output-dir", str(tmp_path / "o2")])
    assert "has no usable tokenizer files" in err


def test_captions_of_the_same_image_are_positives_not_negatives():
    from upop.tasks.retrieval import soft_targets

    ids = torch.tensor([0, 0, 1])
    assert soft_targets(ids, ids).tolist() == [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    task = get_task("retrieval")
    logits = torch.tensor([[2.0, 2.0, -1.0], [2.0, 2.0, -1.0], [-1.0, -1.0, 3.0]], requires_grad=True)
    targets = soft_targets(ids, ids)
    outputs = {"i2t": logits, "t2i": logits.T, "i2t_targets": targets, "t2i_targets": targets}
    loss = task.loss_from(outputs, None)
    by_hand = -(torch.log_softmax(logits, 1) * soft_targets(ids, ids)).sum(1).mean()
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    # image 0 with the other caption of image 0: a positive, pulled up; one-hot targets would push it down
    assert logits.grad[0, 1] < 0 and logits.grad[1, 0] < 0
    one_hot = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    assert torch.autograd.grad(one_hot, logits)[0][0, 1] > 0


@pytest.mark.ddp
@pytest.mark.e2e
def test_the_contrastive_loss_is_the_same_on_one_and_two_ranks(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("retrieval_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        [sys.executable, str(worker), str(tmp_path)],
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(worker),
            str(tmp_path),
        ],
    ]
    for cmd in runs:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one = torch.load(tmp_path / "grads1.pt", weights_only=True)
    two = torch.load(tmp_path / "grads2.pt", weights_only=True)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert one["ids"].tolist() == [0, 0, 1, 2, 2, 3, 4, 1] and two["ids"].tolist() == [0, 0, 1, 2]
