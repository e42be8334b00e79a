"""Semantic segmentation (Segmenter; ADE20K's protocol).

Training: random resize (the shorter side to 0.5-2.0 x the crop size), a random crop to the crop size (``--image-size``,
default the model's), padding with the ignore label where the image is smaller, horizontal flip (p 0.5); pixel
cross-entropy with the ignore index 255.

Evaluation: single-scale (the image's shorter side resized to the crop size, then sliding windows of the crop size,
stride ``STRIDE`` x the crop, averaged where they overlap, upsampled to the annotation's size) and, on the report split,
multi-scale (ratios 0.5-1.75 of that size, each with its horizontal flip, class probabilities averaged). Metrics from
torchmetrics' confusion matrix (summed over DDP ranks): ``miou`` (the mean over classes present in the annotation or
the prediction of intersection / union, the main metric), ``pixel_accuracy``, ``mean_accuracy``, and ``*_ms`` for
multi-scale.

Data: the built-in shapes world (classes: background and the five shapes), or an ADE20K folder
(``images/{training,validation}/*.jpg``, ``annotations/{training,validation}/*.png``, single-channel class ids):
label 0 is ignored and labels 1..150 become classes 0..149. The selection split is carved from training, the report
split is validation. Every annotation is checked before training: an image without an annotation, an annotation of
another size than its image, an RGB annotation, or a label above 150 is refused, naming the file.

Beside ``report.md`` a run writes ``segmentation.png``: report-split images as image | ground truth | dense
prediction | compressed prediction, in one palette with a legend of the class names shown.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from upop.data.ade20k import ADE20K_CLASSES, IGNORE, ade_split
from upop.data.augment import task_preset
from upop.data.config import DataConfig
from upop.data.shapes import SEGMENTATION_CLASSES, ShapesWorld, semantic_map
from upop.data.splits import ROLES, Carved, Splits, builtin_roles, carve, carved_about, default_select_size
from upop.errors import UPopError
from upop.tasks.base import Task, evaluating, kl_distill, register_task
from upop.utils.dist import unwrap
from upop.utils.extras import available, require

VIT_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Segmenter's default ("vit" in a variant.yml)

SCALE_RANGE = (0.5, 2.0)
RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
STRIDE = 2 / 3  # the least window stride, as a share of the window (see default_stride)
CAT_MAX_RATIO = 0.75  # Segmenter's training crop: no class over 75% of the crop's labelled pixels (when it can)
MAX_ASPECT = 4  # the longer side is at most 4 x the shorter one after resizing (as mmseg's img_scale 2048 x 512)
PICTURES = 4


# ---------------------------------------------------------------------------------------------------------- geometry
def resized_shape(h: int, w: int, short: float) -> tuple[int, int]:
    """(h, w) scaled so the shorter side is ``short`` (the longer at most ``MAX_ASPECT`` x ``short``)."""
    scale = min(short / min(h, w), MAX_ASPECT * short / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def crop_box(labels: torch.Tensor, crop: int, cat_max_ratio: float = 1.0, tries: int = 10) -> tuple[int, int]:
    """(top, left) of a random ``crop`` x ``crop`` box of ``labels`` (H, W). With ``cat_max_ratio`` < 1 (mmseg's
    RandomCrop, Segmenter's 0.75), a box is redrawn (up to ``tries`` times, the last draw then kept) until it shows
    more than one class and no class covers more than that share of its labelled pixels."""
    h, w = labels.shape
    for attempt in range(tries + 1):
        top = int(torch.randint(0, max(1, h - crop + 1), ()))
        left = int(torch.randint(0, max(1, w - crop + 1), ()))
        if cat_max_ratio >= 1.0 or attempt == tries:
            break
        window = labels[top : top + crop, left : left + crop]
        counts = torch.bincount(window[window != IGNORE].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio:
            break
    return top, left


def augment(
    image: torch.Tensor, labels: torch.Tensor, crop: int, cat_max_ratio: float = 1.0, photometric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training augmentation of one image (3, H, W) in [0, 1] and its labels (H, W): random resize, random crop
    (``crop_box``), horizontal flip, and with ``photometric`` Segmenter's photometric distortion; not padded
    (``pad``). Draws from torch's global generator."""
    ratio = float(torch.empty(()).uniform_(*SCALE_RANGE))
    h, w = resized_shape(*labels.shape, crop * ratio)
    image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    labels = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    top, left = crop_box(labels, crop, cat_max_ratio)
    image, labels = image[:, top : top + crop, left : left + crop], labels[top : top + crop, left : left + crop]
    if float(torch.rand(())) < 0.5:
        image, labels = image.flip(-1), labels.flip(-1)
    if photometric:
        image = photometric_distortion(image)
    return image, labels


def pad(image: torch.Tensor, labels: torch.Tensor, crop: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom and right to ``crop`` x ``crop``: the image with ``value``, the labels with ``IGNORE``."""
    sides = (0, crop - image.shape[2], 0, crop - image.shape[1])
    return F.pad(image, sides, value=value), F.pad(labels, sides, value=IGNORE)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (3, H, W) -> HSV with hue in [0, 1)."""
    r, g, b = x
    high, low = x.max(0).values, x.min(0).values
    delta = high - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(
        high > 0, delta / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(high)
    )
    return torch.stack([hue, saturation, high])


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = x
    k = torch.stack([(n + hue * 6) % 6 for n in (5.0, 3.0, 1.0)])
    return value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion (Segmenter's training), on an image in [0, 1]: each with probability 0.5,
    brightness + U(-32, 32) / 255, contrast x U(0.5, 1.5) (before the colour steps or after them, at random),
    saturation x U(0.5, 1.5) and hue + U(-18, 18) degrees of 180 (OpenCV's half-degree hue), clipped to [0, 1]."""

    def maybe() -> bool:
        return float(torch.rand(())) < 0.5

    def uniform(a: float, b: float) -> float:
        return float(torch.empty(()).uniform_(a, b))

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return (x * uniform(0.5, 1.5)).clamp(0, 1) if maybe() else x

    if maybe():
        image = (image + uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = maybe()
    if contrast_first:
        image = contrast(image)
    if maybe():
        hsv = _rgb_to_hsv(image)
        hsv[1] = (hsv[1] * uniform(0.5, 1.5)).clamp(0, 1)
        image = _hsv_to_rgb(hsv)
    if maybe():
        hsv = _rgb_to_hsv(image)
        hsv[0] = (hsv[0] + int(torch.randint(-18, 18, ())) / 180) % 1.0
        image = _hsv_to_rgb(hsv)
    return image if contrast_first else contrast(image)


def windows(h: int, w: int, size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of sliding windows covering an h x w image; one window per side shorter than
    ``size``; the last window of each row and column flush with the border."""

    def starts(n: int) -> list[int]:
        if n <= size:
            return [0]
        out = list(range(0, n - size, stride))
        return out + [n - size]

    return [(t, left, min(size, h), min(size, w)) for t in starts(h) for left in starts(w)]


def default_stride(size: int) -> int:
    """The sliding window's stride: the window minus 32 pixels (the original's reported setting: 480 at 512), or
    2/3 of the window where that is larger (windows under 96 pixels)."""
    return max(1, size - 32, round(STRIDE * size))


@torch.no_grad()
def sliding_logits(
    model: nn.Module, image: torch.Tensor, size: int, batch: int = 16, stride: int | None = None
) -> torch.Tensor:
    """Class scores (C, H, W) of one image (3, H, W) from sliding windows of ``size`` (``stride``, default
    ``default_stride``), averaged where windows overlap."""
    h, w = image.shape[1:]
    boxes = windows(h, w, size, stride or default_stride(size))
    total, count = None, torch.zeros(1, h, w, device=image.device)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        crops = torch.stack([image[:, t : t + bh, lf : lf + bw] for t, lf, bh, bw in chunk])
        scores = model(crops).float()
        if total is None:
            total = torch.zeros(scores.shape[1], h, w, device=image.device)
        for (t, lf, bh, bw), s in zip(chunk, scores):
            total[:, t : t + bh, lf : lf + bw] += s
            count[:, t : t + bh, lf : lf + bw] += 1
    return total / count


def scaled_shape(h: int, w: int, ratio: float, size: int, mode: str = "true") -> tuple[int, int]:
    """The shape an (h, w) evaluation image takes at ``ratio``: scaled by it ("true"), or, in the original's
    "reference" mode, brought back up so its shorter side is at least the window ``size`` (so ratios 0.5 and 0.75
    of a 512 image are evaluated at 512, blurred)."""
    h, w = (max(1, round(d * ratio)) for d in (h, w))
    if mode == "reference" and min(h, w) < size:
        h, w = (max(1, int(d * size / min(h, w))) for d in (h, w))
    return h, w


@torch.no_grad()
def predict(
    model: nn.Module,
    image: torch.Tensor,
    out_size: tuple[int, int],
    size: int,
    ratios=(1.0,),
    flip: bool = False,
    stride: int | None = None,
    mode: str = "true",
) -> torch.Tensor:
    """Class probabilities (C, *out_size) of ``image`` (3, h, w, already at the evaluation size): for every ratio
    (and its horizontal flip), sliding-window scores of the image resized by it (``scaled_shape``), upsampled to
    ``out_size``, softmaxed, then averaged."""
    probs = None
    for ratio in ratios:
        h, w = scaled_shape(*image.shape[1:], ratio, size, mode)
        scaled = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            logits = sliding_logits(model, x, size, stride=stride)
            logits = logits.flip(-1) if flipped else logits
            p = F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0].softmax(0)
            probs = p if probs is None else probs + p
    return probs / (len(ratios) * (2 if flip else 1))


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU (over classes with a non-empty union), pixel accuracy and mean class accuracy (over classes present in
    the annotations), in percent, from a confusion matrix (rows: truth, columns: prediction)."""
    cm = confusion.double()
    tp, truth, pred = cm.diag(), cm.sum(1), cm.sum(0)
    union = truth + pred - tp
    present = union > 0
    labelled = truth > 0
    return {
        "miou": 100.0 * float((tp[present] / union[present]).mean()) if present.any() else 0.0,
        "pixel_accuracy": 100.0 * float(tp.sum() / cm.sum().clamp(min=1)),
        "mean_accuracy": 100.0 * float((tp[labelled] / truth[labelled]).mean()) if labelled.any() else 0.0,
    }


# ------------------------------------------------------------------------------------------------------------ data
class Pixels(Dataset):
    """Images with per-pixel labels. ``load(i)`` -> (image (3, H, W) in [0, 1], labels (H, W) long). Training
    samples are augmented to ``crop`` x ``crop``; evaluation samples keep their labels at full size and resize the
    image so its shorter side is ``crop`` (batched as lists: ``collate``)."""

    def __init__(
        self, load: Callable[[int], tuple], n: int, crop: int, normalization: tuple, train: bool, preset: str = "light"
    ) -> None:
        self.load, self.n, self.crop, self.train, self.preset = load, n, crop, train, preset
        self.mean = torch.tensor(normalization[0]).view(3, 1, 1)
        self.std = torch.tensor(normalization[1]).view(3, 1, 1)
        if not train:
            self.collate = _as_lists

    def __len__(self) -> int:
        return self.n

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.load(i)
        if self.train:
            original = self.preset == "segmenter"  # the class-ratio crop, photometric distortion, padding after
            image, labels = augment(image, labels, self.crop, CAT_MAX_RATIO if original else 1.0, original)
            if original:  # normalising, so the padding is the mean colour (mmseg pads after Normalize)
                return pad(self.normalise(image), labels, self.crop, 0.0)
            image, labels = pad(image, labels, self.crop, 0.0)  # black, then normalised
            return self.normalise(image), labels
        size = resized_shape(*labels.shape, self.crop)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return self.normalise(image), labels


def _as_lists(batch: list[tuple]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [b[0] for b in batch], [b[1] for b in batch]


def builtin_split(n: int, seed: int, size: int, noise: float) -> Callable[[int], tuple]:
    """Scenes of the shapes world rendered at ``size`` with their class maps, kept as uint8."""
    world = ShapesWorld(n, seed=seed, image_size=size, noise=noise)
    images, labels = [], []
    for start in range(0, n, 4096):
        index = torch.arange(start, min(n, start + 4096))
        x, seg = world.render(index)
        images.append((x * 255).round().to(torch.uint8))
        labels.append(semantic_map(world, index, seg).to(torch.uint8))
    pixels, classes = torch.cat(images), torch.cat(labels)
    return lambda i: (pixels[i].float() / 255, classes[i].long())


# ------------------------------------------------------------------------------------------------------------ task
@register_task
class Segmentation(Task):
    name = "segmentation"
    main_metric = "miou"
    model_kind = "segmenter"
    pictures_need_dense = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.classes: tuple[str, ...] = SEGMENTATION_CLASSES
        self.report: Dataset | None = None
        self.crop = 0
        self.preset = "light"

    @classmethod
    def num_outputs(cls, data: DataConfig) -> int:
        return len(SEGMENTATION_CLASSES) if data.builtin else len(ADE20K_CLASSES)

    def datasets(self, data: DataConfig, roles: tuple[str, ...] = ROLES) -> Splits:
        crop = self.crop = int(data.image_size)
        norm = self.normalization(VIT_NORMALIZATION)
        preset = self.preset = task_preset(data.augment, data.builtin, ("light", "segmenter"), self.name, "light")
        if data.builtin:
            made, about = {}, {}
            for name, size, seed in builtin_roles(data, roles):
                load = builtin_split(size, seed, crop, data.noise)
                made[name] = Pixels(load, size, crop, norm, name == "train", preset)
                about[name] = {"source": f"built-in scenes, classes background + 5 shapes (seed {seed})", "size": size}
            self.classes = SEGMENTATION_CLASSES
        else:
            made, about = self._ade20k(Path(data.root), data, crop, norm, roles)
            self.classes = ADE20K_CLASSES
        if "train" in made:
            about["train"]["augment"] = (
                f"resize {SCALE_RANGE[0]}-{SCALE_RANGE[1]}, crop {crop}, pad, flip"
                if preset == "light"
                else f"segmenter: resize {SCALE_RANGE[0]}-{SCALE_RANGE[1]}, crop {crop} with class ratio at most "
                f"{CAT_MAX_RATIO}, flip, photometric distortion, padding after normalisation"
            )
        stride = self.options.window_stride or default_stride(crop)
        about["report"]["evaluation"] = (
            f"windows {crop} px, stride {stride}; single-scale and multi-scale ({', '.join(map(str, RATIOS))}, "
            f"flips, {self.options.multiscale_mode} scales)"
        )
        self.report = made["report"]
        return Splits(made.get("train"), made.get("select"), made["report"], about)

    def _ade20k(
        self, root: Path, data: DataConfig, crop: int, norm: tuple, roles: tuple[str, ...]
    ) -> tuple[dict[str, Dataset], dict[str, Any]]:
        """The splits of an ADE20K folder: validation reported; training (when asked for) with a selection split
        carved from it."""
        if not root.is_dir():
            raise UPopError(f"dataset folder {root} does not exist")
        if "train" in roles:
            load, n, source = ade_split(root, "training")
        report_load, n_report, report_source = ade_split(root, "validation")
        about: dict[str, Any] = {"report": {"source": report_source, "size": n_report}}
        made: dict[str, Dataset] = {"report": Pixels(report_load, n_report, crop, norm, False)}
        if "train" not in roles:
            return made, about
        train = Pixels(load, n, crop, norm, True, self.preset)
        size = default_select_size(n) if data.select_size is None else data.select_size
        if size:
            kept, picked = carve(torch.zeros(n, dtype=torch.long), size, data.seed)
            made["select"] = Carved(Pixels(load, n, crop, norm, False), picked.tolist())
            train = Carved(train, kept.tolist())
            about["select"] = carved_about(picked, source, data.seed)
        made["train"] = train
        about["train"] = {"source": source, "size": len(train)}
        return made, about

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch[0])

    def loss_from(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch[1], ignore_index=IGNORE)

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """Per-pixel KD over the classes."""
        return kl_distill(student.movedim(1, -1), teacher.movedim(1, -1), temperature)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        from torchmetrics.classification import MulticlassConfusionMatrix

        n = len(self.classes)
        multi = loader.dataset is self.report
        stride, mode = self.options.window_stride, self.options.multiscale_mode
        matrices = {s: MulticlassConfusionMatrix(n, ignore_index=IGNORE).to(device) for s in ("", "_ms")[: 1 + multi]}
        with evaluating(model):
            for images, labels in loader:
                for image, label in zip(images, labels):
                    image, label = image.to(device), label.to(device)
                    probs = predict(model, image, tuple(label.shape), self.crop, stride=stride)
                    matrices[""].update(probs.argmax(0)[None], label[None])
                    if multi:
                        probs = predict(model, image, tuple(label.shape), self.crop, RATIOS, True, stride, mode)
                        matrices["_ms"].update(probs.argmax(0)[None], label[None])
        out = {}
        for suffix, matrix in matrices.items():
            out.update({f"{k}{suffix}": v for k, v in scores(matrix.compute()).items()})
        return out

    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        """Images at the crop size (the token counts of training and of each evaluation window)."""
        images = batch if isinstance(batch, torch.Tensor) else batch[0]
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
        if isinstance(images, torch.Tensor):
            return images.to(device)
        crop = self.crop or int(images[0].shape[-1])
        return torch.stack([F.interpolate(x[None], size=(crop, crop), mode="bilinear")[0] for x in images]).to(device)

    def extra_files(
        self, model: nn.Module, device: torch.device, batch_size: int, dense: nn.Module | None = None
    ) -> dict[str, bytes]:
        """``segmentation.png``: the first report-split images, their annotation, the dense and the compressed
        model's single-scale predictions (``dense`` None: only the model's)."""
        if self.report is None or not available("matplotlib"):
            return {}  # (the job says when pictures cannot be drawn)
        models = {"prediction": model} if dense is None else {"dense": dense, "compressed": model}
        rows = []
        for i in range(min(PICTURES, len(self.report))):
            image, label = self.report[i]
            preds = {}
            for name, m in models.items():
                with evaluating(m):
                    probs = predict(
                        unwrap(m), image.to(device), tuple(label.shape), self.crop, stride=self.options.window_stride
                    )
                preds[name] = probs.argmax(0).cpu()
            shown = F.interpolate(image[None], size=tuple(label.shape), mode="bilinear", align_corners=False)[0]
            rows.append((shown * self.report.std + self.report.mean, label, preds))
        return {"segmentation.png": picture(rows, self.classes)}


def palette(n: int) -> torch.Tensor:
    """(n + 1, 3) colours in [0, 1]: n distinct class colours (golden-ratio hues), then black for the ignore label."""
    import colorsys

    colours = [
        colorsys.hsv_to_rgb((0.13 + i * 0.618034) % 1, 0.65 + 0.3 * (i % 2), 0.95 - 0.3 * (i % 3 == 2))
        for i in range(n)
    ]
    return torch.tensor([*colours, (0.0, 0.0, 0.0)])


def picture(rows: list[tuple], classes: tuple[str, ...]) -> bytes:
    """A PNG grid: per row image | ground truth | each prediction, one palette, a legend of the classes shown."""
    matplotlib = require("matplotlib", "the segmentation pictures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = palette(len(classes))

    def paint(labels: torch.Tensor) -> torch.Tensor:
        index = torch.where(labels == IGNORE, len(classes), labels).clamp(0, len(classes))
        return colours[index]

    names = ["image", "ground truth", *rows[0][2]]
    fig, axes = plt.subplots(len(rows), len(names), figsize=(2.2 * len(names), 2.2 * len(rows) + 0.8), squeeze=False)
    shown: set[int] = set()
    for r, (image, label, preds) in enumerate(rows):
        panels = [image.clamp(0, 1).permute(1, 2, 0), paint(label), *(paint(p) for p in preds.values())]
        shown |= set(label[label != IGNORE].unique().tolist())
        for p in preds.values():
            shown |= set(p.unique().tolist())
        for c, panel in enumerate(panels):
            axes[r, c].imshow(panel.numpy(), interpolation="nearest")
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(names[c], fontsize=9)
    handles = [Patch(color=colours[k].tolist(), label=classes[k]) for k in sorted(shown)]
    handles.append(Patch(color=(0, 0, 0), label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
