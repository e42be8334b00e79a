"""Task plug-ins: data, loss, metric and example inputs. The engine knows tasks only through this interface; a task
knows its model through the ``ModelBundle`` it is built for (its tokenizer, normalisation), never by reading a
family's files.

Every task gives three splits (``upop.data.splits``): ``train``, ``select`` (picks the best epoch, never reported)
and ``report`` (every number in a report).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from upop.data.config import DataConfig
from upop.data.splits import ROLES, Splits
from upop.errors import UPopError
from upop.models.bundle import ModelBundle, Normalization
from upop.utils.stats import binomial_error

VQA_INFERENCE = ("rank", "generate")
ANSWER_GROUPING = ("normalised", "raw")
MULTISCALE_MODES = ("true", "reference")


@dataclass(frozen=True)
class TaskOptions:
    """Settings of a task beyond its data (saved in the run's config). Each task reads its own; the defaults are the
    project's, the paper's configs (``configs/``) turn the original's on.

    Attributes:
        vqa_inference: how the VQA task answers: "rank" (BLIP's: candidates of the answer list) or "generate".
        answer_grouping: VQA training weights each distinct answer of a question by its share of the human
            answers, the answers compared after the metric's "normalised" form (default) or as "raw" strings (the
            original's).
        rerank_k: BLIP retrieval: the candidates per query its evaluation rescores by ITM (the original's: 256 on
            COCO, 128 on Flickr30K).
        momentum_distill: retrieval training with BLIP's momentum distillation: an exponential moving average of
            the model (0.995), a queue of its features (``queue_size``) as extra contrastive candidates, and soft
            targets 0.4 x the momentum model's similarities + 0.6 x the ground truth (the 0.4 ramped up over the first
            epoch of each phase). The compressed model's momentum copy starts from the compressed weights.
        queue_size: the feature queue's length (the original's: 57600).
        clamp_temperature: clamp the contrastive temperature at every step to BLIP's [0.001, 0.5] (CLIP: the logit
            scale to at most 100), as the original does.
        negatives_all_ranks: BLIP retrieval's ITM draws hard negatives from the whole global batch (every rank's
            images and captions), as the original does, not from the rank's own.
        nlvr_swap: NLVR2 training swaps the two images of a sample with probability 0.5, and then "left" and "right"
            in its sentence (the original's).
        window_stride: segmentation's sliding-window stride in pixels (default: the window minus 32, the original's
            reported setting).
        multiscale_mode: segmentation's multi-scale evaluation: "true" (default: every scale at its own size) or
            "reference" (the original's: a scaled image whose shorter side is below the window is upsampled back to
            it, so scales 0.5 and 0.75 become blurred copies of scale 1).
    """

    vqa_inference: str = "rank"
    answer_grouping: str = "normalised"
    rerank_k: int = 128
    momentum_distill: bool = False
    queue_size: int = 57600
    clamp_temperature: bool = False
    negatives_all_ranks: bool = False
    nlvr_swap: bool = False
    window_stride: int | None = None
    multiscale_mode: str = "true"

    def __post_init__(self) -> None:
        if self.vqa_inference not in VQA_INFERENCE:
            raise UPopError(f"--vqa-inference must be one of {', '.join(VQA_INFERENCE)}, got {self.vqa_inference!r}")
        if self.answer_grouping not in ANSWER_GROUPING:
            raise UPopError(
                f"--answer-grouping must be one of {', '.join(ANSWER_GROUPING)}, got {self.answer_grouping!r}"
            )
        if self.multiscale_mode not in MULTISCALE_MODES:
            raise UPopError(
                f"--multiscale-mode must be one of {', '.join(MULTISCALE_MODES)}, got {self.multiscale_mode!r}"
            )
        for name in ("rerank_k", "queue_size"):
            if getattr(self, name) < 1:
                raise UPopError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.window_stride is not None and self.window_stride < 1:
            raise UPopError(f"--window-stride must be a positive number of pixels, got {self.window_stride}")


class Task(abc.ABC):
    """A task provides exactly: ``name``, ``main_metric`` (the metric "best" refers to, higher is better),
    ``model_kind`` (the kind of model ``upop.models.build`` builds for it), and the abstract methods below. ``loss``
    and ``distill_loss`` have defaults built on ``outputs``/``loss_from``.

    A task is built for one model: ``bundle`` gives its tokenizer and normalisation (None for tasks of image-only
    models built in tests; a method that needs the tokenizer then says so)."""

    name: str = ""
    main_metric: str = ""
    model_kind: str = "classifier"

    def __init__(self, bundle: ModelBundle | None = None, options: TaskOptions | None = None) -> None:
        self.bundle = bundle
        self.options = options or TaskOptions()

    @classmethod
    def num_outputs(cls, data: DataConfig) -> int:
        """Size of the model's output head for this data (e.g. the number of classes; 0 without a head), known
        before the model and the data sets are built."""
        return 0

    @abc.abstractmethod
    def datasets(self, data: DataConfig, roles: tuple[str, ...] = ROLES) -> Splits:
        """The train, select and report splits, yielding batches the task's ``loss`` understands after default
        collation; only the report split when ``roles`` is ("report",) (an evaluation reads no training data).
        ``data.image_size`` is resolved (the model's unless given)."""

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

    def standard_error(self, metrics: dict[str, Any], size: int) -> float:
        """The standard error of the main metric measured on ``size`` samples (how far noise alone moves it; the
        selection rule's unit): by default the binomial error of a percentage, sqrt(m (100 - m) / size). Tasks
        whose main metric is not a share of samples override it."""
        return binomial_error(metrics[self.main_metric], size)

    @abc.abstractmethod
    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        """The inputs of ``model`` for a batch of an evaluation loader (for profiling and FLOPs cost)."""

    def normalization(self, default: Normalization) -> Normalization:
        """The (mean, std) images are normalised with: the model's where its family fixes one, else ``default``."""
        if self.bundle is not None and self.bundle.normalization is not None:
            return self.bundle.normalization
        return default

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (``ModelBundle.tokenizer``)."""
        if self.bundle is None or self.bundle.tokenizer is None:
            raise UPopError(f"the {self.name} task needs the model's tokenizer: build the task for a model bundle")
        return self.bundle.tokenizer

    def tokenize(
        self, texts: list[str], device: torch.device, max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``texts`` by the model's tokenizer: {"input_ids", "attention_mask"} (long tensors on ``device``), at most
        ``max_length`` tokens each when given."""
        return tokenize(self.tokenizer, texts, device, max_length)

    def begin_step(self, epoch: int, index: int, steps: int) -> None:
        """Called before each training step: batch ``index`` of the ``steps`` of ``epoch`` (0-based) of the phase
        (e.g. for a loss weight ramped over the first epoch)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The training state the task carries between steps (e.g. momentum encoders and feature queues): tensors
        and plain values, saved in every checkpoint so a resumed run continues it."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned ({} from a checkpoint without task state)."""
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


def tokenize(
    tokenizer: Any, texts: list[str], device: torch.device, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """``texts`` by ``tokenizer`` (a bundle's: it returns a dict or a tensor of ids): {"input_ids",
    "attention_mask"} on ``device``; ``max_length`` caps the tokens of a text (BLIP's tokenizers take it)."""
    tokens = tokenizer(list(texts)) if max_length is None else tokenizer(list(texts), max_length=max_length)
    if isinstance(tokens, torch.Tensor):
        tokens = {"input_ids": tokens}
    return {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}


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


def task_class(name: str) -> type[Task]:
    """The registered task called ``name``; UPopError listing the supported ones otherwise."""
    if name not in _TASKS:
        raise UPopError(f"unknown task {name!r}; supported: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def get_task(name: str, bundle: ModelBundle | None = None, options: TaskOptions | None = None) -> Task:
    """The task ``name`` built for ``bundle``'s model."""
    return task_class(name)(bundle, options)


def registered_tasks() -> dict[str, type[Task]]:
    return dict(_TASKS)
