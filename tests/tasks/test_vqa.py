"""VQA: the standard answer normalisation and accuracy, answer weights, the built-in questions (true to the scenes,
partial credit exercised), rank inference against brute force, masked == compressed answers (generate and rank),
BLIP's VQA format with its bad inputs, the test-dev submission, the released checkpoints' keys, an HF directory, and
the CLI end to end with all four towers in one budget."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import _blip_configs, blip_decoder_original_layout
from PIL import Image

import upop
from upop.cli import main
from upop.data.config import DataConfig
from upop.data.questions import ANSWER_TYPES, PLURAL, answer_list, scene_questions
from upop.data.shapes import COLOUR_NAMES, SHAPES, ShapesWorld
from upop.data.statements import render_visible
from upop.data.vqa import Questions
from upop.errors import UPopError
from upop.models import build, load_weights
from upop.models.blip.checkpoints import converter
from upop.models.blip.modeling import BlipVqa
from upop.tasks import TaskOptions, get_task
from upop.tasks.vqa import answer_weights, normalise_answer, vqa_accuracy

DATA = "--task vqa --model blip-micro --train-size 64 --val-size 16 --batch-size 16".split()


@pytest.mark.parametrize(
    "raw,normal",
    [
        ("Two", "2"),
        ("the dog", "dog"),
        ("Yes.", "yes"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("black/white", "black white"),
        ("dont know", "don't know"),
        ("a red, blue flag", "red blue flag"),
        ("  none ", "0"),
    ],
)
def test_the_standard_answer_normalisation(raw, normal):
    assert normalise_answer(raw) == normal


def test_accuracy_gives_partial_credit_over_the_ten_leave_one_out_subsets():
    humans = ["2"] * 2 + ["3"] * 8
    # left out a "2": 1 match of 3 -> 1/3 (twice); left out a "3": 2 matches -> 2/3 (eight times)
    assert vqa_accuracy("two", humans) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("3", humans) == 1.0
    assert vqa_accuracy("4", humans) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)


def test_each_answer_is_weighted_by_its_share_of_the_humans():
    answers, weights = answer_weights(["2"] * 7 + ["two"] + ["3"] * 2)
    assert answers == ["2", "3"] and weights == pytest.approx([0.8, 0.2])


def test_built_in_questions_are_true_to_the_scenes_and_exercise_partial_credit():
    n = 300
    pixels, questions, answers, kinds, truths = scene_questions(n, seed=5, image_size=32)
    world = ShapesWorld(n, seed=5, image_size=32)
    _, visible = render_visible(world)
    candidates = set(answer_list())
    for i in range(n):
        shown = [
            (SHAPES[int(world.shape[i, k])], COLOUR_NAMES[int(world.colour[i, k])])
            for k in range(int(world.count[i]))
            if visible[i, k]
        ]
        q, truth = questions[i], truths[i]
        if kinds[i] == 0:
            assert q == f"what colour is the large {SHAPES[int(world.shape[i, 0])]}?"
            assert truth == COLOUR_NAMES[int(world.colour[i, 0])]
        elif kinds[i] == 1:
            plural = q.removeprefix("how many ").removesuffix(" are there?")
            shape = {v: k for k, v in PLURAL.items()}[plural]
            assert truth == str(sum(s == shape for s, _ in shown))
        else:
            words = q.rstrip("?").split()
            assert truth == ("yes" if (words[-1], words[-2]) in shown else "no")
        assert len(answers[i]) == 10
        assert {normalise_answer(a) for a in answers[i]} <= candidates
    scores = [vqa_accuracy(t, a) for t, a in zip(truths, answers)]
    assert all(s == 1.0 for s in scores)  # the truth scores full marks...
    others = [next((h for h in a if normalise_answer(h) != t), None) for t, a in zip(truths, answers)]
    partial = [vqa_accuracy(o, a) for o, a in zip(others, answers) if o is not None]
    assert len(partial) > n / 3  # ...and many questions have a synonym, miscount or flip among the answers,
    assert all(s > 0 for s in partial) and sum(s < 1 for s in partial) > 0.8 * len(partial)  # partial credit
    assert {ANSWER_TYPES[k] for k in kinds} == set(ANSWER_TYPES)
    assert sum(t == "yes" for t in truths) > 0.3 * sum(k == 2 for k in kinds)
    assert scene_questions(20, seed=5)[1:] == scene_questions(20, seed=5)[1:]  # deterministic


def _vqa(seed=0, vocab=50):
    torch.manual_seed(seed)
    vision, text = _blip_configs(2, 8, 2, 24, 16, vocab=vocab)
    vision.initializer_range = text.initializer_range = 0.25
    return BlipVqa(vision, text, enc_token_id=2).eval()


def _batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 49, (n, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # a padded question
    return torch.randn(n, 3, 16, 16, generator=g), ids * mask, mask


def _candidates(count=9):
    ids = torch.zeros(count, 4, dtype=torch.long)
    ids[:, 0] = 1
    ids[:, 1] = torch.arange(10, 10 + count) % 3 + 10  # first tokens shared by several candidates
    ids[:, 2] = torch.arange(20, 20 + count)
    ids[:, 3] = 49
    mask = torch.ones_like(ids)
    ids[::2, 3], mask[::2, 3] = 0, 0  # some shorter
    return ids, mask


def _smoothed_scores(model, a_ids, a_mask, states, mask):
    """BLIP's rank score written out: minus the sum over the answer's tokens of the label-smoothed (0.1) loss,
    0.9 x (-log p(token)) + 0.1 x the mean over the vocabulary of -log p."""
    logp = model.decode(a_ids, a_mask, states, mask)[:, :-1].log_softmax(-1)
    target = logp.gather(2, a_ids[:, 1:, None]).squeeze(2)
    per_token = 0.9 * target + 0.1 * logp.mean(-1)
    return (per_token * a_mask[:, 1:]).sum(1)


def test_rank_scores_answers_by_blip_s_label_smoothed_loss():
    model = _vqa().double()
    x, ids, mask = _batch()
    a_ids, a_mask = _candidates()
    states = model.question_states(x.double(), ids, mask)
    for q in range(len(x)):
        s, m = states[q : q + 1].expand(len(a_ids), -1, -1), mask[q : q + 1].expand(len(a_ids), -1)
        expected = _smoothed_scores(model, a_ids, a_mask, s, m)
        torch.testing.assert_close(model.answer_scores(a_ids, a_mask, s, m).double(), expected)
        plain = model.decode(a_ids, a_mask, s, m)[:, :-1].log_softmax(-1).gather(2, a_ids[:, 1:, None]).squeeze(2)
        assert not torch.allclose(expected, (plain * a_mask[:, 1:]).sum(1))  # not the plain log-likelihood


def test_rank_picks_the_best_scored_candidate_among_the_top_k_by_first_token():
    model = _vqa().double()
    x, ids, mask = _batch()
    x = x.double()
    a_ids, a_mask = _candidates()
    states = model.question_states(x, ids, mask)
    brute = []
    for q in range(len(x)):
        s, m = states[q : q + 1].expand(len(a_ids), -1, -1), mask[q : q + 1].expand(len(a_ids), -1)
        brute.append(int(_smoothed_scores(model, a_ids, a_mask, s, m).argmax()))
    assert model.rank(x, ids, mask, a_ids, a_mask, k=len(a_ids)).tolist() == brute
    start = torch.ones(len(x), 1, dtype=torch.long)
    first = model.text_decoder(input_ids=start, encoder_hidden_states=states, encoder_attention_mask=mask).logits[:, 0]
    top1 = first[:, a_ids[:, 1]].argmax(1)  # with k = 1 the first token alone decides (the first of equal ones)
    assert model.rank(x, ids, mask, a_ids, a_mask, k=1).tolist() == top1.tolist()


@pytest.mark.parametrize("granularity", ["dim", "head", "mixed"])
def test_masked_and_compressed_models_give_the_same_answers_by_generate_and_rank(granularity):
    from test_caption import _choice

    model = _vqa().double()
    x, ids, mask = _batch()
    x = x.double()
    a_ids, a_mask = _candidates()

    def answers(m):
        out = [m.generate(x, ids, mask, num_beams=b, max_length=8, min_length=5) for b in (1, 3)]
        return out, m.rank(x, ids, mask, a_ids, a_mask, k=4)

    dense = answers(model)
    pruner = upop.Pruner(
        model, upop.PruneConfig(p=0.5, total_steps=10, granularity=granularity, align_attn=1, align_mlp=1)
    )
    assert {s.tower for s in pruner.structures} == {"vision", "text", "cross", "decoder"}
    ones = answers(model)
    assert all(torch.equal(a, b) for a, b in zip(ones[0], dense[0])) and torch.equal(ones[1], dense[1])
    pruner.set_choice(_choice(pruner), value=0.0)
    masked = answers(model)
    compressed = pruner.compress(force=True)
    out = answers(compressed)
    assert all(torch.equal(a, b) for a, b in zip(out[0], masked[0]))
    assert torch.equal(out[1], masked[1])
    assert not all(torch.equal(a, b) for a, b in zip(masked[0], dense[0]))  # pruning changed the model


# --------------------------------------------------------------------------------------------- BLIP's VQA format
WORDS = ["what", "colour", "is", "the", "large", "circle", "?", "red", "blue", "yes", "no"]


def _folder(root, train=None, val=None, test=None, answers=("red", "blue", "yes", "no")):
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    for i in range(4):
        Image.new("RGB", (20, 20), (60 * i, 20, 200 - 40 * i)).save(root / "img" / f"{i}.jpg")

    def entries(n, start):
        colour = lambda i: "red" if i % 2 else "blue"  # noqa: E731
        return [
            {
                "question_id": start + i,
                "question": "what colour is the large circle?",
                "image": f"img/{i % 4}.jpg",
                "answer": [colour(i)] * 8 + ["yes", colour(i + 1)],
            }
            for i in range(n)
        ]

    for name, given, default in (("train", train, entries(40, 0)), ("val", val, entries(8, 100))):
        (root / f"vqa_{name}.json").write_text(json.dumps(default if given is None else given))
    if test is not None:
        (root / "vqa_test.json").write_text(json.dumps(test))
    if answers is not None:
        (root / "answer_list.json").write_text(json.dumps(list(answers)))
    return root


def test_a_vqa_folder_trains_and_writes_the_test_dev_submission(tmp_path):
    test = [
        {"question_id": 900 + i, "question": "what colour is the large circle?", "image": f"img/{i}.jpg"}
        for i in range(3)
    ]
    root = _folder(tmp_path / "vqa", test=test)
    out = tmp_path / "out"
    args = ["--task", "vqa", "--model", "blip-micro", "--data", str(root), "--batch-size", "8", "--select-size", "8"]
    assert main(["train", *args, "--epochs", "1", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["select"]["size"] == 8 and report["splits"]["train"]["size"] == 32
    assert report["splits"]["test"]["written"] == "vqa_test_submission.json"
    submission = json.loads((out / "vqa_test_submission.json").read_text())
    assert [row["question_id"] for row in submission] == [900, 901, 902]
    assert all(row["answer"] in ("red", "blue", "yes", "no") for row in submission)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(train=[{"question_id": 1, "question": "what?", "image": "img/0.jpg", "answer": []}]), "has no answers"),
        (dict(val=[{"question_id": 1, "question": "what?", "image": "img/0.jpg"}]), "has no answers"),
        (dict(answers=None), "no answer_list.json"),
        (
            dict(test=[{"question_id": 7, "question": "what?", "image": "img/0.jpg"}] * 2),
            "question_id 7 repeats entry 0",
        ),
        (dict(val=[{"question_id": 1, "question": "what?", "image": "img/9.jpg", "answer": ["no"]}]), "img/9.jpg"),
    ],
)
def test_bad_vqa_input_is_one_line_and_writes_nothing(tmp_path, capsys, change, message):
    root = _folder(tmp_path / "vqa", **change)
    out = tmp_path / "out"
    args = ["--task", "vqa", "--model", "blip-micro", "--data", str(root), "--batch-size", "8"]
    assert main(["train", *args, "--epochs", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------- weights from elsewhere
def test_a_released_blip_vqa_checkpoint_loads_through_the_key_map(tmp_path):
    source, target = _vqa(0), _vqa(1)
    original = blip_decoder_original_layout(source.state_dict())
    assert "text_encoder.encoder.layer.0.crossattention.self.key.weight" in original
    original["text_encoder_m.embeddings.word_embeddings.weight"] = torch.zeros(2)
    path = tmp_path / "model_base_vqa_capfilt_large.pth"
    torch.save({"model": original}, path)
    load_weights(target, path, converter("vqa"))
    x, ids, mask = _batch()
    assert torch.equal(target.generate(x, ids, mask, max_length=6), source.generate(x, ids, mask, max_length=6))


def test_an_hf_blip_vqa_directory_answers_as_hf_s_model(tmp_path):
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering

    vision, text = _blip_configs(3, 2, 2, 24, 16, vocab=50)  # one width (6) for both towers, as HF's VQA model needs
    vision.initializer_range = text.initializer_range = 0.25
    torch.manual_seed(0)
    hf = BlipForQuestionAnswering(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict())).eval()
    hf.save_pretrained(tmp_path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[ENC]", *WORDS]
    (tmp_path / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(50 - len(words))]) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    bundle = build(f"hf:{tmp_path}", "vqa")
    model = bundle.model.eval()
    q = bundle.tokenizer(["what colour is the large circle?"] * 2)
    ids = q["input_ids"].clone()
    ids[:, 0] = 5  # BLIP puts the encoder token first; HF's model reads the ids as given
    x = torch.randn(2, 3, 16, 16)
    ours = model.generate(x, q["input_ids"], q["attention_mask"], max_length=6, min_length=6)
    assert torch.equal(ours, hf.generate(input_ids=ids, pixel_values=x, max_length=6, min_length=6))


@pytest.mark.e2e
def test_cli_compresses_vqa_over_all_four_towers_in_one_budget(tmp_path):
    base, out = tmp_path / "base", tmp_path / "c"
    assert main(["train", *DATA, "--epochs", "1", "--output-dir", str(base)]) == 0
    args = [*DATA, "--pretrained", str(base / "model.safetensors"), "--epochs-search", "1", "--epochs", "1"]
    assert main(["compress", *args, "--p", "0.5", "--vqa-inference", "generate", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["kept_by_tower"]) == {"vision", "text", "cross", "decoder"}
    assert report["splits"]["report"]["inference"] == "generate"
    assert {"accuracy", "accuracy_yes_no", "accuracy_number", "accuracy_other"} <= set(report["compressed"]["metrics"])
    assert abs(report["pruned_cost_fraction"] - 0.5) < 0.01


@pytest.mark.ddp
@pytest.mark.e2e
def test_generative_metrics_are_the_same_on_one_and_two_ranks(tmp_path):
    """Captions and answers are made on each rank's shard and gathered: the metrics are those of the whole split."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("generative_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for cmd in ([sys.executable, str(worker), str(tmp_path)], [*torchrun, str(worker), str(tmp_path)]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "metrics1.json").read_text())
    two = json.loads((tmp_path / "metrics2.json").read_text())
    assert one["caption"]["cider"] > 0 and one["vqa"]["accuracy"] > 0
    for task in ("caption", "vqa"):
        assert two[task] == pytest.approx(one[task])


def test_raw_grouping_keeps_spellings_apart_and_a_scale_weighs_every_answer():
    answers, weights = answer_weights(["2"] * 7 + ["two"] + ["3"] * 2, raw=True, scale=0.2)
    assert answers == ["2", "two", "3"] and weights == pytest.approx([0.14, 0.02, 0.04])


def test_several_training_files_with_visual_genome_weights_and_a_report_file_among_them(tmp_path):
    """BLIP's VQA recipe: vqa_train + vqa_val + vg_qa, a Visual Genome answer weighing 0.2 and its image read under
    its own root; the val file reported though trained on is said to be so."""
    root = _folder(tmp_path / "vqa")
    vg_images = tmp_path / "vg"
    (vg_images / "image").mkdir(parents=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(vg_images / "image" / "1.jpg")
    vg = [
        {"question_id": q, "question": "what colour?", "answer": "red", "image": "image/1.jpg", "dataset": "vg"}
        for q in (0, 1, 2)  # ids may repeat another file's
    ]
    (root / "vg_qa.json").write_text(json.dumps(vg))
    files = ("vqa_train.json", "vqa_val.json", "vg_qa.json")
    data = DataConfig(root=str(root), image_size=16, select_size=0, vqa_train_files=files, vg_image_root=str(vg_images))
    task = get_task("vqa", build("blip-micro", "vqa"), TaskOptions(answer_grouping="raw"))
    splits = task.datasets(data)
    assert len(splits.train) == 40 + 8 + 3 and splits.about["train"]["visual_genome"] == 3
    assert "not a held-out number" in splits.about["report"]["note"]
    image, question, answers, _, weight = splits.train[48]
    assert (question, answers, weight) == ("what colour?", ["red"], 0.2) and image.shape == (3, 16, 16)
    assert splits.train[0][4] == 1.0
    batch = Questions.collate([splits.train[0], splits.train[48]])
    out = task.outputs(task.bundle.model, batch)
    # question 0: red x8 (0.8), yes (0.1), blue (0.1); the VG question: red at 0.2
    assert out["weights"].tolist() == pytest.approx([0.8, 0.1, 0.1, 0.2])
    missing = DataConfig(root=str(root), image_size=16, vqa_train_files=("nope.json",))
    with pytest.raises(UPopError, match="--vqa-train-files: .*nope.json does not exist"):
        task.datasets(missing)
    (root / "vg_qa.json").write_text(json.dumps([{**vg[0], "image": "image/9.jpg"}]))
    with pytest.raises(UPopError, match=f"does not exist: {vg_images / 'image' / '9.jpg'}"):
        task.datasets(data)  # a Visual Genome image is named by its full path (it is not under --image-root)
