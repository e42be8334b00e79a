"""Text and images prepared as the original code prepares them: BLIP's pre_caption / pre_question (lower case, a
few marks out, a cap on the words) and token caps per task, and evaluation images resized to a square without a
crop."""

from __future__ import annotations

import torch
from PIL import Image

from upop.data.images import image_reader
from upop.data.text import pre_caption, pre_question
from upop.models import build
from upop.tasks import get_task


def test_pre_caption_reads_marks_as_spaces_and_caps_the_words():
    assert pre_caption("A Dog (brown) jumps!  Over: the fence.") == "a dog brown jumps over the fence"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("a red circle left of a blue square") == "a red circle left of a blue square"  # built-in


def test_pre_question_removes_marks_but_keeps_the_question_mark():
    assert pre_question("What colour is the dog's (left) ear?") == "what colour is the dog's left ear?"
    assert pre_question("is there a red circle?") == "is there a red circle?"  # a built-in question, unchanged


def _ids(task, texts):
    return task.tokenize(texts, torch.device("cpu"))["input_ids"]


def test_a_statement_with_a_full_stop_tokenises_as_without_it():
    task = get_task("nlvr", build("blip-micro", "nlvr"))
    ends = task.statements(["Both images contain a red object."], torch.device("cpu"))["input_ids"]
    plain = _ids(task, ["both images contain a red object"])
    assert torch.equal(ends, plain)


def test_blip_s_token_caps_per_task():
    captions = build("blip-micro", "captioner")
    tokens = captions.tokenizer(["a red circle left of a blue square and a green cross"], max_length=5)
    assert int(tokens["attention_mask"].sum()) == 5  # <bos> four words... cut at the cap, <eos> last
    vqa = get_task("vqa", build("blip-micro", "vqa"))
    long = "is there " + "a red circle and " * 10 + "?"
    assert int(vqa.questions([long], torch.device("cpu"))["attention_mask"].sum()) <= 35


def test_evaluation_images_are_squashed_to_a_square_not_cropped(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 4, 20))  # a white stripe at the far left, which a centre crop would cut
    image.save(tmp_path / "wide.png")
    x = image_reader(tmp_path, ["wide.png"], 16)(0)
    assert x.shape == (3, 16, 16)
    left, middle = x[:, :, 0].mean(), x[:, :, 8].mean()
    assert left > middle + 1.0  # the stripe is still there, at the left edge
