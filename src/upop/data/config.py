"""Where a task's data comes from and how it is prepared: a frozen dataclass, validated on construction and saved
beside every output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from upop.data.augment import PRESETS
from upop.errors import UPopError


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

    def __post_init__(self) -> None:
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
        if not self.builtin:
            for key in ("train_size", "val_size", "noise"):
                d.pop(key)
        else:
            d.pop("image_root")
        return d
