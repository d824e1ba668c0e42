"""The records modules exchange: typed, so a renamed key is a type error, not a gap in a report.

Each is a ``TypedDict`` because it is written to JSON as it is (``metrics.jsonl``,
``results.json``, ``sweep.json``, ``state.pt``) and read back by the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import torch

Log = Callable[[str], None]  # where progress lines go: print for the CLI, a no-op when quiet


class _EpochRequired(TypedDict):
    phase: str  # "pretrain" or "finetune"
    epoch: int
    epochs: int
    train_loss: float  # mean over every training image of the epoch
    seconds: float
    images_per_s: float
    lr: float


class Validation(TypedDict, total=False):
    """What a phase's evaluation at the end of an epoch measured."""

    val_loss: float
    val_accuracy: float


class EpochRecord(_EpochRequired, Validation, total=False):
    """One line of ``metrics.jsonl``."""

    # and train_<term>: the mean per image of every named term the criterion returned beside its loss
    # (joint training's ``supervised`` cross-entropy and ``unsupervised`` cost, before its weight)


def loss_terms(rec: EpochRecord) -> dict[str, float]:
    """The named loss terms an epoch record holds beside ``train_loss``, by name (``supervised``, ...)."""
    return {k[len("train_") :]: v for k, v in rec.items() if k.startswith("train_") and k != "train_loss"}


@dataclass
class Batch:
    """What one training step reads: images ``x`` (and labels ``y``) of the stream an epoch walks,
    and, for a step that mixes two streams, a ``labelled`` batch drawn beside it."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    labelled: Batch | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def chunks(self, size: int) -> Iterator[Batch]:
        """Micro-batches of ``size`` images of ``x`` (the whole batch when ``size`` >= its length; a
        last one of one image is merged into the one before); a ``labelled`` batch is split into as
        many parts."""
        n = len(self)
        step = size if 0 < size < n else n
        starts = list(range(0, n, step)) or [0]
        if len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()  # a last chunk of one image joins the one before it (a batch norm needs two)
        ends = starts[1:] + [n]
        side = list(self.labelled.split(len(starts))) if self.labelled is not None else [None] * len(starts)
        for i, j, part in zip(starts, ends, side):
            yield Batch(self.x[i:j], None if self.y is None else self.y[i:j], part)

    def split(self, parts: int) -> Iterator[Batch]:
        xs = self.x.tensor_split(parts)
        ys = self.y.tensor_split(parts) if self.y is not None else [None] * parts
        return (Batch(x, y) for x, y in zip(xs, ys))


class ClassScore(TypedDict):
    accuracy: float | None
    correct: int
    total: int


class Evaluation(TypedDict):
    """A classifier over an evaluation set (:func:`convae.evaluate.evaluate_classifier`)."""

    loss: float
    accuracy: float
    confusion_matrix: list[list[int]]


class Representation(TypedDict, total=False):
    """kNN and linear probe of a frozen encoder (``results.json``'s ``representation``)."""

    knn_accuracy: float
    knn: dict[str, Any]
    linear_probe_accuracy: float
    linear_probe: dict[str, Any]
    train_images: int
    test_images: int
    bank_sample: str  # only when the bank was larger than PROBE_BANK: what it was sampled to
    features: str  # "latent" or "pooled"
    random: dict[str, float]  # the same probes on the same architecture with random weights
    encoder: str
    bank: str
    eval_set: str
    seconds: float


class Results(TypedDict, total=False):
    """``results.json``: overall and per-class accuracy and everything measured beside it."""

    accuracy: float | None
    num_images: int
    classes: list[str]
    per_class: dict[str, ClassScore]
    confusion_matrix: list[list[int]]
    eval_set: str
    eval_label: str  # the evaluation set's short name ("validation split", "test data")
    kernel_shape: list[int]  # the first layer's kernels the figures show: (K, C, k, k)
    loss: float
    init: str
    freeze_encoder: bool
    labelled_images: int
    checkpoint: str
    representation: Representation
    timing: dict[str, float]
    best: dict[str, Any]  # the fine-tuning epoch of the highest evaluation accuracy, saved as classifier_best.pt
    precision: str  # the precision that ran (auto resolved)
    provenance: dict[str, str]  # convae and torch versions, date, device and its name, precision
    finished: str  # written last: the run wrote everything


class SweepCell(TypedDict):
    """One (method, budget, seed) of a sweep."""

    method: str
    labels_per_class: int | str
    seed: int
    labelled_images: int
    accuracy: float
    seconds: float
    epoch_losses: NotRequired[list[float]]  # a recipe cell's mean training loss per epoch (probes have none)
    curve: NotRequired[list[list[float]]]  # with --curves: [optimizer steps done, evaluation accuracy] per epoch


class TrainingState(TypedDict):
    """``checkpoints/state.pt``: everything needed to continue a run where it stopped."""

    format: str
    phase: str
    epoch: int  # completed epochs of ``phase``
    step: int  # batches done in the epoch after those
    loss_sum: float
    elapsed: float
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rng: torch.Tensor
    metrics: list[EpochRecord]
    timing: dict[str, float]
    kernels: torch.Tensor
    config: dict[str, Any]
    average: NotRequired[dict[str, Any] | None]  # the fine-tuning weight average (--ema), when kept
    scaler: NotRequired[dict[str, Any] | None]  # the fp16 gradient scaler's state
    terms: NotRequired[dict[str, Any] | None]  # the criterion's named terms summed in the epoch stopped mid-way
