"""BLIP's training details: its image augmentation (crop, flip, RandomAugment's operations at magnitude 5), NLVR2's
left/right swap (images and words together), text dropout and drop path set on a built model, and the presets a task
does not take refused in one line."""

from __future__ import annotations

import pytest
import torch

from upop.cli import main
from upop.data import blip_augment as B
from upop.data.config import DataConfig
from upop.data.nlvr2 import Statements, swap_sides
from upop.errors import UPopError
from upop.models import build
from upop.models.regularise import regularise
from upop.tasks import TaskOptions, get_task


def test_each_operation_at_magnitude_5():
    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    image[:, 8:12, 8:12] = 200
    torch.manual_seed(0)
    moved = B.apply_op(image, "translate_x")
    shift = 5 if moved[0, 10, 13] == 200 else -5  # 5 pixels, either way
    assert torch.equal(moved[:, 8:12, 8 + shift : 12 + shift], image[:, 8:12, 8:12])
    assert (moved[:, :, :5] == 128).all() or (moved[:, :, -5:] == 128).all()  # uncovered: grey 128
    sheared = B.apply_op(image, "shear_x")
    assert sheared[0, 0, 10] == image[0, 0, 10]  # about the top-left corner: row 0 stays
    assert not torch.equal(sheared, image)
    rotated = B.apply_op(image, "rotate")
    assert rotated[0, 0, 0] == 128 and rotated[0, 10, 10] == 200  # corners filled, centre kept
    assert torch.equal(B.apply_op(image, "brightness"), image) and torch.equal(B.apply_op(image, "sharpness"), image)
    assert B.apply_op(image, "autocontrast").max() >= 254  # stretched to the full range
    assert torch.equal(B.apply_op(image, "identity"), image)


def test_random_augment_draws_two_operations_applied_with_probability_a_half(monkeypatch):
    applied = []
    monkeypatch.setattr(B, "apply_op", lambda image, op: applied.append(op) or image)
    torch.manual_seed(0)
    for _ in range(400):
        B.random_augment(torch.zeros(3, 4, 4, dtype=torch.uint8))
    assert 320 < len(applied) < 480  # 2 x 400 x 0.5
    assert set(applied) == set(B.OPS)


def test_a_training_image_is_cropped_from_the_image_at_its_own_size():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    out = [B.blip_train_image(image, 16) for _ in range(8)]
    assert all(o.shape == (3, 16, 16) and o.dtype == torch.uint8 for o in out)
    assert len({o.float().sum().item() for o in out}) == 8  # random


def test_the_built_in_images_are_augmented_in_the_normalised_space_they_live_in():
    from upop.data.images import CLIP_MEAN, CLIP_STD, normalise_clip

    pixels = torch.rand(2, 3, 16, 16)
    load = B.augmented(lambda i: normalise_clip(pixels[i]), 16, CLIP_MEAN, CLIP_STD)
    torch.manual_seed(0)
    x = load(0)
    assert x.shape == (3, 16, 16)
    back = x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert float(back.min()) >= -1e-5 and float(back.max()) <= 1 + 1e-5  # still images in [0, 1]
    pair = B.augmented(lambda i: normalise_clip(pixels), 16, CLIP_MEAN, CLIP_STD)(0)
    assert pair.shape == (2, 3, 16, 16)


def test_the_swap_exchanges_the_images_and_left_and_right_together():
    # cleaned as BLIP cleans it, then whole words swapped: "right," keeps its comma and is not a whole "right"
    swapped = swap_sides("The left image has MORE dogs than the right, left.")
    assert swapped == "the right image has more dogs than the right, right"
    assert swap_sides("the dog on the left's side") == "the dog on the left's side"  # whole words only
    images = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    data = Statements(lambda i: images, ["a dog on the left"], torch.tensor([1]), swap=True)
    torch.manual_seed(0)
    seen = {data[0][1] for _ in range(40)}
    assert seen == {"a dog on the left", "a dog on the right"}
    for _ in range(20):
        pair, sentence, label = data[0]
        assert (pair[0].sum() == 0) == (sentence == "a dog on the left") and int(label) == 1
    assert {Statements(lambda i: images, ["left"], torch.tensor([0]))[0][1] for _ in range(10)} == {"left"}


def test_nlvr_swaps_only_training_samples():
    task = get_task("nlvr", build("blip-micro", "nlvr"), TaskOptions(nlvr_swap=True))
    splits = task.datasets(DataConfig(train_size=8, val_size=4, image_size=16))
    assert splits.train.swap and not splits.select.swap and not splits.report.swap
    assert splits.about["train"]["augment"] == "none, left/right swap"


def test_text_dropout_and_drop_path_on_blip_leave_evaluation_unchanged():
    torch.manual_seed(0)
    model = build("blip-micro", "nlvr").model
    images, ids = torch.randn(2, 2, 3, 16, 16), torch.randint(3, 20, (2, 6))
    model.eval()
    before = model(images, ids, torch.ones_like(ids))
    regularise(model, drop_path=0.5, text_dropout=0.3)
    text = [m for n, m in model.named_modules() if n.startswith("text_") and isinstance(m, torch.nn.Dropout)]
    vision = [m for n, m in model.named_modules() if n.startswith("vision") and isinstance(m, torch.nn.Dropout)]
    assert text and all(d.p == 0.3 for d in text) and all(d.p != 0.3 for d in vision)
    torch.testing.assert_close(model(images, ids, torch.ones_like(ids)), before)  # eval: no dropout, no drop path
    model.train()
    regularise(model, drop_path=0.5, text_dropout=0.0)
    torch.manual_seed(1)
    first = model(images, ids, torch.ones_like(ids))
    second = model(images, ids, torch.ones_like(ids))
    assert not torch.allclose(first, second)  # the last block's branches drop at random
    regularise(model, drop_path=0.0, text_dropout=0.0)
    torch.testing.assert_close(model(images, ids, torch.ones_like(ids)), model(images, ids, torch.ones_like(ids)))


def test_drop_path_rises_linearly_over_the_segmenter_encoder():
    model = build("segmenter-micro", "segmenter", 3).model
    regularise(model, drop_path=0.1, text_dropout=None)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1])


def test_settings_a_model_does_not_have_are_refused():
    clip = build("clip-micro", "dual_encoder").model  # HF CLIP: pre-norm residual blocks, no dropout modules
    regularise(clip, drop_path=0.1, text_dropout=None)
    with pytest.raises(UPopError, match="--text-dropout: a CLIPModel has no text tower with dropout"):
        regularise(clip, drop_path=None, text_dropout=0.1)
    with pytest.raises(UPopError, match="--drop-path: a Sequential has no image encoder"):
        regularise(torch.nn.Sequential(torch.nn.Linear(2, 2)), drop_path=0.1, text_dropout=None)
    with pytest.raises(UPopError, match="must lie in"):
        regularise(clip, drop_path=1.5, text_dropout=None)


@pytest.mark.parametrize(
    "task,model,augment",
    [
        ("classification", "vit-micro", "blip"),
        ("nlvr", "blip-micro", "deit"),
        ("segmentation", "segmenter-micro", "blip"),
    ],
)
def test_a_preset_the_task_does_not_take_is_one_line(tmp_path, capsys, task, model, augment):
    out = tmp_path / "out"
    argv = ["train", "--task", task, "--model", model, "--augment", augment, "--train-size", "8", "--val-size", "4"]
    assert main([*argv, "--epochs", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--augment {augment}: the {task} task trains with" in err
    assert not out.exists()
