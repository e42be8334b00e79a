"""Segmentation: the built-in class maps, ADE20K's folder and label mapping with its bad inputs, the training
augmentation, sliding-window and multi-scale inference, the mIoU arithmetic, the released checkpoints (variant.yml
with its tuples, nothing executed), and the CLI end to end with encoder and decoder in one budget and the picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import SEGMENTER_VARIANT, ade_folder, released_segmenter
from PIL import Image

import upop.tasks.segmentation as seg
from upop.cli import main
from upop.data.shapes import SHAPES, ShapesWorld, semantic_map
from upop.errors import UPopError
from upop.models.segmenter.modeling import build_segmenter
from upop.models.segmenter.variant import load_segmenter

DATA = "--task segmentation --model segmenter-micro --train-size 64 --val-size 8 --batch-size 16".split()


def test_the_built_in_class_maps_name_the_shape_that_shows():
    world = ShapesWorld(12, seed=4, image_size=24)
    index = torch.arange(12)
    _, objects = world.render(index)
    classes = semantic_map(world, index, objects)
    assert (classes[objects == 0] == 0).all()
    for i in range(12):
        for k, o in enumerate(world.objects(i)):
            where = objects[i] == k + 1
            assert (classes[i][where] == 1 + SHAPES.index(o.shape)).all()


def test_augmentation_crops_pads_with_the_ignore_label_and_flips_image_and_labels_together(monkeypatch):
    monkeypatch.setattr(seg, "SCALE_RANGE", (10 / 12, 10 / 12))  # shorter side 12 x 10/12: no resampling
    labels = torch.arange(10 * 14).view(10, 14) % 7
    image = torch.stack([labels.float() / 10, torch.zeros(10, 14), torch.ones(10, 14)])
    torch.manual_seed(0)
    flips = 0
    for _ in range(20):
        x, y = seg.pad(*seg.augment(image, labels, 12), 12, 0.0)
        assert x.shape == (3, 12, 12) and y.shape == (12, 12)
        padded = y == seg.IGNORE
        assert padded[10:].all() and not padded[:10].any()  # 10 rows of image: the rest is padding
        assert (x[2][padded] == 0).all() and (x[2][~padded] == 1).all()
        assert torch.equal((x[0][~padded] * 10).round().long(), y[~padded])  # the same pixels moved together
        flips += bool(torch.equal(y[:10], labels[:, :12].flip(-1)) or torch.equal(y[:10], labels[:, 2:].flip(-1)))
    assert 0 < flips < 20


def test_the_class_ratio_crop_redraws_boxes_one_class_fills():
    labels = torch.zeros(40, 40, dtype=torch.long)
    labels[:, 30:] = 1  # class 0 fills three quarters: most 12-px boxes show it alone
    labels[:2, :2] = seg.IGNORE
    torch.manual_seed(0)

    def ratio(top, left):
        window = labels[top : top + 12, left : left + 12]
        counts = torch.bincount(window[window != seg.IGNORE].flatten(), minlength=2)
        return float(counts.max()) / float(counts.sum()), int((counts > 0).sum())

    plain = [ratio(*seg.crop_box(labels, 12)) for _ in range(200)]
    capped = [ratio(*seg.crop_box(labels, 12, 0.75)) for _ in range(200)]
    # a uniform box breaks the rule with probability 24/29 (its left edge in 0-21 or 27-28); with redraws only when
    # all 11 draws do (0.83^11, about 13%, the last draw then kept unchecked)
    broken, still = sum(r >= 0.75 for r, _ in plain), sum(r >= 0.75 for r, _ in capped)
    assert broken > 140 and still < broken / 3
    assert all(n == 2 for r, n in capped if r < 0.75)


def test_the_photometric_distortion_stays_in_range_and_hsv_round_trips():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 9)
    torch.testing.assert_close(seg._hsv_to_rgb(seg._rgb_to_hsv(image)), image, atol=1e-5, rtol=1e-5)
    outs = [seg.photometric_distortion(image) for _ in range(30)]
    assert all(o.shape == image.shape and 0 <= float(o.min()) and float(o.max()) <= 1 for o in outs)
    assert sum(not torch.allclose(o, image) for o in outs) > 20  # 1 in 16 draws changes nothing


def test_segmenter_preset_pads_after_normalising_and_the_default_pads_black(monkeypatch):
    monkeypatch.setattr(seg, "SCALE_RANGE", (0.5, 0.5))  # shorter side 8 of a 16 crop: padded below and right
    image, labels = torch.full((3, 8, 12), 0.2), torch.ones(8, 12, dtype=torch.long)
    for preset, expected in (("light", -1.0), ("segmenter", 0.0)):  # vit normalisation: black is -1, the mean 0
        torch.manual_seed(1)
        data = seg.Pixels(lambda i: (image, labels), 1, 16, seg.VIT_NORMALIZATION, True, preset)
        x, y = data[0]
        padded = y == seg.IGNORE
        assert padded.any() and (x[:, padded] == expected).all(), preset


def test_the_stride_is_the_window_minus_32_and_reference_scales_come_back_to_the_window():
    assert seg.default_stride(512) == 480 and seg.default_stride(32) == 21  # 2/3 of a small window
    assert [b[1] for b in seg.windows(512, 683, 512, seg.default_stride(512))] == [0, 171]
    assert seg.scaled_shape(512, 683, 0.5, 512, "true") == (256, 342)
    assert seg.scaled_shape(512, 683, 0.5, 512, "reference") == (512, 684)
    assert seg.scaled_shape(512, 683, 1.5, 512, "reference") == (768, 1024)


def test_windows_cover_the_image_with_the_last_flush_to_the_border():
    assert seg.windows(8, 8, 16, 10) == [(0, 0, 8, 8)]  # smaller than a window: one window
    boxes = seg.windows(20, 35, 16, 10)
    assert {b[0] for b in boxes} == {0, 4} and {b[1] for b in boxes} == {0, 10, 19}
    cover = torch.zeros(20, 35)
    for t, left, h, w in boxes:
        cover[t : t + h, left : left + w] += 1
    assert (cover > 0).all()


class _Local(torch.nn.Module):
    """A per-pixel model (a 1x1 convolution): its scores do not depend on the window, so sliding windows must give
    exactly its whole-image scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_windows_of_a_per_pixel_model_give_its_whole_image_scores():
    model, x = _Local(), torch.randn(3, 23, 37)
    torch.testing.assert_close(seg.sliding_logits(model, x, 16), model(x[None])[0])


def test_multi_scale_inference_averages_the_probabilities_of_every_scale_and_flip():
    model, x = _Local(), torch.randn(3, 20, 20)
    out = seg.predict(model, x, (20, 20), 16, ratios=(0.5, 1.0), flip=True)
    expected = 0
    for r in (0.5, 1.0):
        s = torch.nn.functional.interpolate(x[None], scale_factor=r, mode="bilinear", align_corners=False)[0]
        for flipped in (False, True):
            logits = model((s.flip(-1) if flipped else s)[None])
            logits = logits.flip(-1) if flipped else logits
            up = torch.nn.functional.interpolate(logits, size=(20, 20), mode="bilinear", align_corners=False)
            expected = expected + up[0].softmax(0) / 4
    torch.testing.assert_close(out, expected)


def test_miou_counts_classes_present_in_truth_or_prediction_only():
    # truth rows, prediction columns; class 3 never appears: left out of the mean
    cm = torch.tensor([[5, 1, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    cm[2, 1] = 0
    cm[1, 2] = 1  # class 2 predicted once, never true: IoU 0, counted
    out = seg.scores(cm)
    ious = [5 / (6 + 7 - 5), 2 / (5 + 3 - 2), 0.0]
    assert out["miou"] == pytest.approx(100 * sum(ious) / 3)
    assert out["pixel_accuracy"] == pytest.approx(100 * 7 / 11)
    assert out["mean_accuracy"] == pytest.approx(100 * (5 / 6 + 2 / 5) / 2)


# --------------------------------------------------------------------------------------------------------- ADE20K
def test_ade20k_labels_0_are_ignored_and_1_to_150_become_0_to_149(tmp_path):
    load, n, _ = seg.ade_split(ade_folder(tmp_path), "validation")
    image, labels = load(1)
    assert n == 3 and image.shape == (3, 20, 28) and labels.shape == (20, 28)
    assert set(labels.unique().tolist()) == {1, seg.IGNORE}  # labels 2 (both halves) -> class 1, 0 -> ignored
    assert set(load(0)[1].unique().tolist()) == {0, 1, seg.IGNORE}  # label 1 -> class 0


def _break(root, how):
    label = root / "annotations" / "validation" / "1.png"
    if how == "size":
        Image.fromarray(np.zeros((9, 9), dtype=np.uint8), mode="L").save(label)
        return "is 9x9, its image 1.jpg 28x20"
    if how == "label":
        Image.fromarray(np.full((20, 28), 151, dtype=np.uint8), mode="L").save(label)
        return "has label 151"
    if how == "missing":
        label.unlink()
        return "1.jpg has no annotation"
    Image.fromarray(np.zeros((20, 28, 3), dtype=np.uint8)).save(label)
    return "is RGB, not a single-channel PNG"


@pytest.mark.parametrize("how", ["size", "label", "missing", "rgb"])
def test_bad_ade20k_annotations_are_one_line_and_nothing_is_written(tmp_path, capsys, how):
    root = ade_folder(tmp_path / "ade")
    message = _break(root, how)
    out = tmp_path / "out"
    args = ["--task", "segmentation", "--model", "segmenter-micro", "--data", str(root), "--batch-size", "2"]
    assert main(["train", *args, "--epochs", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.e2e
def test_an_ade20k_folder_trains_with_150_classes(tmp_path):
    root, out = ade_folder(tmp_path / "ade"), tmp_path / "out"
    args = ["--task", "segmentation", "--model", "segmenter-micro", "--data", str(root), "--batch-size", "2"]
    assert main(["train", *args, "--select-size", "2", "--epochs", "1", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["train"]["size"] == 4 and report["splits"]["report"]["size"] == 3
    assert {"miou", "miou_ms", "pixel_accuracy"} <= set(report["metrics"])
    assert (out / "segmentation.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------- released checkpoints


def test_a_released_checkpoint_loads_from_its_variant_yml_without_its_imagenet_head(tmp_path):
    (tmp_path / "variant.yml").write_text(SEGMENTER_VARIANT)
    torch.manual_seed(0)
    source = build_segmenter(
        dict(
            image_size=32,
            patch_size=8,
            d_model=32,
            n_heads=2,
            n_layers=2,
            n_cls=150,
            distilled=True,
            decoder={"name": "mask_transformer", "n_layers": 2},
        )
    ).eval()
    state = dict(source.state_dict())
    state["encoder.head.weight"], state["encoder.head.bias"] = torch.zeros(1000, 32), torch.zeros(1000)
    state["encoder.head_dist.weight"] = torch.zeros(1000, 32)
    torch.save({"model": state, "epoch": 63}, tmp_path / "checkpoint.pth")
    bundle = load_segmenter(tmp_path / "checkpoint.pth", n_cls=150)
    model = bundle.model.eval()
    assert model.decoder.blocks[0].attn.heads == 1  # width 32 / 64, at least 1: the original's rule
    assert bundle.normalization[0] == (0.485, 0.456, 0.406) and bundle.image_size == 32
    x = torch.randn(2, 3, 40, 48)  # another size: positions interpolated, output at the input size
    with torch.no_grad():
        assert torch.equal(model(x), source(x)) and model(x).shape == (2, 150, 40, 48)
    with pytest.raises(UPopError, match="150 classes; the data has 6"):
        load_segmenter(tmp_path, n_cls=6)


def test_a_variant_yml_with_python_objects_is_refused(tmp_path):
    (tmp_path / "variant.yml").write_text("net_kwargs: !!python/object/apply:os.system ['echo pwned']\n")
    torch.save({}, tmp_path / "checkpoint.pth")
    with pytest.raises(UPopError, match="cannot read the Segmenter variant"):
        load_segmenter(tmp_path)


@pytest.mark.e2e
def test_cli_compresses_encoder_and_decoder_in_one_budget_and_draws_both_predictions(tmp_path):
    base, out = tmp_path / "base", tmp_path / "c"
    assert main(["train", *DATA, "--epochs", "1", "--output-dir", str(base)]) == 0
    args = [*DATA, "--pretrained", str(base / "model.safetensors"), "--epochs-search", "1", "--epochs", "1"]
    assert main(["compress", *args, "--p", "0.5", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["kept_by_tower"]) == {"encoder", "decoder"}
    assert {"miou", "miou_ms", "pixel_accuracy_ms"} <= set(report["compressed"]["metrics"])
    assert abs(report["pruned_cost_fraction"] - 0.5) < 0.01
    picture = Image.open(out / "segmentation.png")
    assert picture.size[0] > 4 * 150  # image | ground truth | dense | compressed


@pytest.mark.e2e
def test_cli_compresses_a_released_segmenter_on_an_ade20k_folder(tmp_path):
    """``--model segmenter:PATH``: the architecture, crop size and normalisation from variant.yml, the weights from
    checkpoint.pth; 150 classes as ADE20K's."""
    ckpt = tmp_path / "seg_tiny"
    state = released_segmenter(ckpt)
    root, out = ade_folder(tmp_path / "ade"), tmp_path / "out"
    args = ["--task", "segmentation", "--model", f"segmenter:{ckpt / 'checkpoint.pth'}", "--data", str(root)]
    args += ["--batch-size", "2", "--select-size", "2", "--epochs-search", "1", "--epochs", "0", "--p", "0.3"]
    assert main(["compress", *args, "--output-dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 32 and config["num_outputs"] == 150
    report = json.loads((out / "report.json").read_text())
    assert report["dense"]["params"] == sum(v.numel() for v in state.values())
    assert set(report["kept_by_tower"]) == {"encoder", "decoder"}
