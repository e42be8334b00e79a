"""Task plug-ins: data, loss, metric and example inputs. The engine knows tasks only through this interface.

Every task gives three splits: ``train`` (the weights learn from it), ``select`` (picks the best epoch and is never
reported) and ``report`` (every number in a report). A model is never selected and scored on the same split.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

AUGMENTS = ("auto", "none", "light", "deit")
SELECT_FRACTION, SELECT_MAX = 0.05, 10000  # the default selection split carved from train


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
        from upop.errors import UPopError

        if self.image_size is not None and self.image_size < 8:
            raise UPopError(f"image size must be at least 8, got {self.image_size}")
        if self.train_size < 1 or self.val_size < 1:
            raise UPopError(f"built-in split sizes must be positive, got {self.train_size} and {self.val_size}")
        if self.select_size is not None and self.select_size < 0:
            raise UPopError(f"--select-size must be >= 0 (0: no selection split), got {self.select_size}")
        if self.augment not in AUGMENTS:
            raise UPopError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")

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


@dataclass
class Splits:
    """The three splits of a task, and how each was made (recorded in every report).

    ``select`` is None when there is no selection split (``select_size`` 0): the last epoch is then kept.
    ``about`` maps each split name to a description: its source, size and, for a carved split, the seed and a
    digest of its indices."""

    train: Dataset
    select: Dataset | None
    report: Dataset
    about: dict[str, dict[str, Any]] = field(default_factory=dict)


class Carved(Subset):
    """A subset that keeps the attributes tasks read from their datasets (``classes``, ``captions``...)."""

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def carve(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices 0..len(labels)-1 into (kept, carved) with ``size`` carved, stratified by label: every class gives
    its share (largest remainders first), drawn by a generator seeded with ``seed``. Deterministic on any machine."""
    labels = torch.as_tensor(labels).reshape(-1)
    n = labels.numel()
    size = min(size, n - 1)
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * size / n
    share = exact.floor().long()
    short = size - int(share.sum())
    if short > 0:  # largest remainders, ties broken by class order
        order = torch.sort(exact - share, descending=True, stable=True).indices
        share[order[:short]] += 1
    carved = []
    for c, k in zip(classes.tolist(), share.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        carved.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    picked = torch.sort(torch.cat(carved)).values if carved else torch.empty(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[picked] = False
    return mask.nonzero().squeeze(1), picked


def default_select_size(n_train: int) -> int:
    return max(1, min(SELECT_MAX, round(SELECT_FRACTION * n_train)))


def carved_about(picked: torch.Tensor, source: str, seed: int) -> dict[str, Any]:
    digest = hashlib.sha256(picked.numpy().astype("int64").tobytes()).hexdigest()[:16]
    return {
        "source": f"carved from {source}, stratified by class",
        "size": int(picked.numel()),
        "seed": seed,
        "indices_sha256": digest,
    }


def read_annotation(path: Path, fields: str) -> list[Any]:
    """The non-empty JSON list of an annotation file; one clear line when it cannot be read, is not JSON or is not a
    non-empty list (``fields`` names what its entries hold, for that line)."""
    from upop.errors import UPopError

    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UPopError(f"cannot read the annotation file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UPopError(f"annotation file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(entries, list) or not entries:
        raise UPopError(f"annotation file {path} must be a non-empty JSON list of {{{fields}}} entries")
    return entries


class Task(abc.ABC):
    """A task provides exactly: ``name``, ``main_metric`` (the metric "best" refers to, higher is better), and the
    abstract methods below. ``loss`` and ``distill_loss`` have defaults built on ``outputs``/``loss_from``."""

    name: str = ""
    main_metric: str = ""
    model_kind: str = "classifier"  # what ``upop.models.build_model`` builds for it: "classifier" | "dual_encoder"

    @abc.abstractmethod
    def datasets(self, data: DataConfig) -> Splits:
        """The train, select and report splits, yielding batches the task's ``loss`` understands after default
        collation."""

    @abc.abstractmethod
    def num_outputs(self, train: Dataset) -> int:
        """Size of the model's output head for this data (e.g. the number of classes)."""

    @abc.abstractmethod
    def outputs(self, model: nn.Module, batch: Any) -> Any:
        """The model's outputs that the loss reads (e.g. logits (B, C)), through ``model``'s forward (so a DDP
        wrapper sees every training forward)."""

    @abc.abstractmethod
    def loss_from(self, outputs: Any, batch: Any) -> torch.Tensor:
        """The task loss from ``outputs`` of one batch (already on the model's device)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Metrics over ``loader`` (summed over DDP ranks), each in percent where that is the convention."""

    @abc.abstractmethod
    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        """The inputs of ``model`` for a batch of an evaluation loader (for profiling and FLOPs cost)."""

    def configure(self, options: dict[str, Any]) -> None:
        """Task settings from the run's config (e.g. VQA's inference mode); none by default."""
        return None

    pictures_need_dense: bool = False  # extra_files compares the dense model with the compressed one

    def extra_files(
        self, model: nn.Module, device: torch.device, batch_size: int, dense: nn.Module | None = None
    ) -> dict[str, bytes]:
        """Files a finished job writes beside its report (e.g. a test-server submission, pictures): {name: bytes}.
        ``dense`` is the dense model when the job compressed one and ``pictures_need_dense`` asks for it."""
        return {}

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The task loss of ``model`` on one batch."""
        return self.loss_from(self.outputs(model, batch), batch)

    def train_batch(self, batch: Any) -> Any:
        """A training batch after batch-level augmentation (e.g. Mixup/CutMix); the identity by default."""
        return batch

    def distill_loss(self, student: Any, teacher: Any, temperature: float) -> torch.Tensor:
        """Knowledge distillation from the dense model: KL(softmax(teacher / T) || softmax(student / T)) * T^2 over
        the last dimension of the logits (batch mean). Tasks whose outputs hold several logit tensors override."""
        return kl_distill(student, teacher, temperature)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; its training flag is restored after, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def kl_distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, averaged over rows (fp32)."""
    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=-1)
    t_log = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(
        s_log.reshape(-1, s_log.shape[-1]), t_log.reshape(-1, t_log.shape[-1]), reduction="batchmean", log_target=True
    ) * (t * t)


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
