"""Where a task's data comes from and how it is prepared: a frozen dataclass, validated on construction and saved
beside every output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from upop.data.augment import PRESETS
from upop.errors import UPopError

SELECT_ON = ("select", "report")  # the split that picks the best epoch: a separate one, or the paper's protocol
PAPER_PROTOCOL = "paper protocol: selected on the reported split"


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is prepared. ``root`` None means the built-in shapes world.

    Attributes:
        root: a dataset folder in the task's real format, or None for the built-in generator.
        image_root: where the images named by annotation files are (default: ``root``), for tasks that have them.
        image_size: side of the square input images (None: the model's own input size, resolved by the job).
        train_size / val_size: number of built-in scenes in the training and report splits (ignored for a folder).
        seed: the built-in world's seed (train uses seed, report seed + 1, a generated selection split seed + 2), and
            the seed of the selection split carved from train.
        noise: pixel noise of the built-in world.
        select_size: samples in the selection split (None: the task's default, e.g. 5% of train, at most 10000; 0:
            no selection, the last epoch is kept).
        augment: training augmentation preset: "auto" (none on the built-in world, "light" on image folders),
            "none", "light" or "deit" (see ``upop.data.augment``).
        vqa_train_files: VQA: the annotation files of ``root`` the training split is made of (default: its
            ``*train.json``), e.g. BLIP's vqa_train.json, vqa_val.json and vg_qa.json; a "vg" entry's answer weighs
            0.2 and its image is read under ``vg_image_root``.
        vg_image_root: where the images of Visual Genome's entries are (default: ``image_root``).
        select_on: which split picks the best epoch: "select" (default: a split never reported) or "report" (the
            paper's protocol: the reported split itself, no split carved from train; every report says so).
    """

    root: str | None = None
    image_root: str | None = None
    image_size: int | None = None
    train_size: int = 20000
    val_size: int = 2000
    seed: int = 0
    noise: float = 0.1
    select_size: int | None = None
    augment: str = "auto"
    select_on: str = "select"
    vqa_train_files: tuple[str, ...] = ()
    vg_image_root: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vqa_train_files", tuple(self.vqa_train_files or ()))
        if self.select_on not in SELECT_ON:
            raise UPopError(f"select_on must be one of {', '.join(SELECT_ON)}, got {self.select_on!r}")
        if self.image_size is not None and self.image_size < 8:
            raise UPopError(f"image size must be at least 8, got {self.image_size}")
        if self.train_size < 1 or self.val_size < 1:
            raise UPopError(f"built-in split sizes must be positive, got {self.train_size} and {self.val_size}")
        if self.select_size is not None and self.select_size < 0:
            raise UPopError(f"--select-size must be >= 0 (0: no selection split), got {self.select_size}")
        if self.augment not in PRESETS:
            raise UPopError(f"augment must be one of {', '.join(PRESETS)}, got {self.augment!r}")

    @property
    def builtin(self) -> bool:
        return self.root is None

    def to_dict(self) -> dict[str, Any]:
        """The settings that matter for this data: a folder drops the built-in world's sizes and noise."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["vqa_train_files"] = list(self.vqa_train_files)
        if not self.builtin:
            for key in ("train_size", "val_size", "noise"):
                d.pop(key)
        else:
            for key in ("image_root", "vqa_train_files", "vg_image_root"):
                d.pop(key)
        return d
