"""Task plug-ins: data, loss, metric and example inputs. The engine knows tasks only through this interface."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from. ``root`` None means the built-in shapes world.

    Attributes:
        root: a dataset folder in the task's real format, or None for the built-in generator.
        image_root: where the images named by annotation files are (default: ``root``), for tasks that have them.
        image_size: side of the square input images (None: the model's own input size, resolved by the job).
        train_size / val_size: number of built-in scenes per split (ignored for a folder).
        seed: the built-in world's seed (train uses seed, val seed + 1).
        noise: pixel noise of the built-in world.
    """

    root: str | None = None
    image_root: str | None = None
    image_size: int | None = None
    train_size: int = 20000
    val_size: int = 2000
    seed: int = 0
    noise: float = 0.1

    def __post_init__(self) -> None:
        from upop.errors import UPopError

        if self.image_size is not None and self.image_size < 8:
            raise UPopError(f"image size must be at least 8, got {self.image_size}")
        if self.train_size < 1 or self.val_size < 1:
            raise UPopError(f"built-in split sizes must be positive, got {self.train_size} and {self.val_size}")


class Task(abc.ABC):
    """A task provides exactly: ``name``, ``main_metric`` (the metric "best" refers to, higher is better), and the
    abstract methods below."""

    name: str = ""
    main_metric: str = ""
    model_kind: str = "classifier"  # what ``upop.models.build_model`` builds for it: "classifier" | "dual_encoder"

    @abc.abstractmethod
    def datasets(self, data: DataConfig) -> tuple[Dataset, Dataset]:
        """(train, val) datasets yielding batches the task's ``loss`` understands after default collation."""

    @abc.abstractmethod
    def num_outputs(self, train: Dataset) -> int:
        """Size of the model's output head for this data (e.g. the number of classes)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The task loss of ``model`` on one batch (already on the model's device)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Metrics over ``loader`` (summed over DDP ranks), each in percent where that is the convention."""

    @abc.abstractmethod
    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        """The inputs of ``model`` for a batch of the validation loader (for profiling and FLOPs cost)."""


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.name or cls.name in _TASKS:
        raise ValueError(f"task name {cls.name!r} is empty or already registered")
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    from upop.errors import UPopError

    if name not in _TASKS:
        raise UPopError(f"unknown task {name!r}; supported: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]()


def registered_tasks() -> dict[str, type[Task]]:
    return dict(_TASKS)
