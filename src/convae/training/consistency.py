"""Consistency training: the unlabelled images as their own labels (FixMatch, FlexMatch, FreeMatch).

Every step reads a batch of the unlabelled stream (an epoch is one pass over it; ``--unlabelled-ratio`` times
the labelled batch) and the next batch of the labelled set, which cycles beside it. Each unlabelled image is
seen twice: a weakly augmented view (crop and flip, the run's jitter) and a strongly augmented one
(:mod:`convae.data.randaugment`: RandAugment and Cutout over its own crop and flip). The classifier's prediction
on the weak view, where its confidence passes the threshold, is the hard label of the strong view; the loss is
the labelled batch's cross-entropy plus ``joint_weight`` times the strong views' cross-entropy (the images below
the threshold count as zero, as FixMatch's mean over the whole unlabelled batch). The threshold:

- ``fixmatch`` (Sohn et al. 2020): fixed, ``--consistency-threshold`` (0.95);
- ``flexmatch`` (Zhang et al. 2021, curriculum pseudo-labelling): per class, the fixed one scaled by
  ``b / (2 - b)``, ``b`` the class's count among the images whose latest prediction passed it, over the largest
  count (the images not yet confident included, the paper's warm-up): low while a class is learnt little;
- ``freematch`` (Wang et al. 2023, self-adaptive): a moving average of the mean confidence (from 1/classes up),
  times per class the moving average of its mean probability over the largest; with the fairness term (its
  ``SAF`` loss, weight ``--fairness-weight``) that keeps the confident predictions spread over the classes.

The weak view's pass runs without autograd (it gives targets, not gradients) and is the one whose batch
statistics move the running ones evaluation uses; the labelled images and the strong views of the images that
passed go through one pass with the running statistics left alone (the strong views' are not clean images').
A strong view below the threshold would add zero to the loss, so it is drawn (the step's random numbers stay the
same) but not passed through the network: the cost of a step falls as
the thresholds hold more back, and with a threshold no prediction passes a step is supervised training's (its
weights; the running statistics are the weak views'). Optionally the autoencoder's pretraining objective on the
weak views through the decoder, weight ``--reconstruction-weight`` (MaskMatch's reconstruction beside the
pseudo-labels), with a copy of the pretrained decoder when training starts from the autoencoder. The images'
labels, where the data has them, score the pseudo-labels (``pseudo_accuracy``: the share of those that passed
that are right, over the epoch; ``mask_correct`` the share of all that passed and are right); ``mask`` is the
share that passed. The thresholds' state is part of the model's state (its
buffers), so ``--resume`` continues it; under DDP every rank updates it with every rank's predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config.modes import TrainingMode, register_training_mode
from ..data import DeviceBatches, ImageSet
from ..data.augment import AugmentConfig, augment
from ..data.randaugment import StrongAugment, strong_augment
from ..models import AutoEncoder, Classifier
from ..models.objectives import Objective, make_objective
from ..utils.errors import ConvaeError
from ..utils.records import Batch
from .joint import check_labels, corrupted, epoch_images_unused, labelled_stream, shared_autoencoder


@dataclass(frozen=True)
class ConsistencySpec:
    """One variant of consistency training and its knobs."""

    policy: str  # "fixed" (FixMatch), "flex" (FlexMatch) or "free" (FreeMatch)
    threshold: float = 0.95  # the fixed threshold; FlexMatch's highest
    weight: float = 1.0  # of the strong views' cross-entropy
    momentum: float = 0.999  # FreeMatch's moving averages
    fairness: float = 0.001  # FreeMatch's fairness term
    reconstruction: float = 0.0  # the autoencoder's objective on the weak views
    label_smoothing: float = 0.0  # of the labelled cross-entropy
    weak: AugmentConfig = field(default_factory=AugmentConfig)
    strong: StrongAugment = field(default_factory=StrongAugment)


# ----------------------------------------------------------------------------- the thresholds


def everyone(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every rank, concatenated in rank order (shards may differ in length); ``t`` itself alone."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    world = torch.distributed.get_world_size()
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    most = int(max(sizes))
    padded = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


class Thresholds(nn.Module):
    """Which weak predictions become labels: ``forward(probs, idx)`` -> the (B,) mask of those that pass,
    after updating the state with them (``idx``: the images' positions in the unlabelled set)."""

    def __init__(self, spec: ConsistencySpec, classes: int, images: int) -> None:
        super().__init__()
        self.spec, self.classes = spec, classes
        if spec.policy == "flex":  # every image's latest confident class (-1: none yet)
            self.register_buffer("selected", torch.full((images,), -1, dtype=torch.long))
        elif spec.policy == "free":
            self.register_buffer("confidence", torch.tensor(1.0 / classes))
            self.register_buffer("class_mean", torch.full((classes,), 1.0 / classes))
            self.register_buffer("class_share", torch.full((classes,), 1.0 / classes))
        elif spec.policy != "fixed":
            raise ValueError(f"unknown threshold policy {spec.policy!r}")

    @torch.no_grad()
    def forward(self, probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        s = self.spec
        top, pseudo = probs.max(dim=1)
        if s.policy == "fixed":
            return top >= s.threshold
        if s.policy == "flex":
            counts = torch.bincount(self.selected + 1, minlength=self.classes + 1)  # [unused, class 0, ...]
            learnt = counts[1:].float() / counts.max().float()  # the paper's warm-up: the unused count included
            scaled = learnt / (2 - learnt)  # its convex mapping
            mask = top >= s.threshold * scaled[pseudo]
            passed = everyone(torch.stack([idx, pseudo, (top >= s.threshold).long()], dim=1))
            keep = passed[:, 2] == 1
            self.selected[passed[keep, 0]] = passed[keep, 1]
            return mask
        # free: the averages first take this batch (every rank's), then judge it
        every = everyone(probs.float())
        m = s.momentum
        self.confidence.mul_(m).add_((1 - m) * every.max(dim=1).values.mean())
        self.class_mean.mul_(m).add_((1 - m) * every.mean(dim=0))
        hist = torch.bincount(every.argmax(dim=1), minlength=self.classes).float()
        self.class_share.mul_(m).add_((1 - m) * hist / hist.sum())
        local = self.class_mean / self.class_mean.max()
        return top >= self.confidence * local[pseudo]


def fairness_loss(logits: torch.Tensor, class_mean: torch.Tensor, class_share: torch.Tensor) -> torch.Tensor:
    """FreeMatch's self-adaptive fairness term on the strong views' ``logits`` of the images that passed: the
    batch's mean prediction, normalised by its histogram, against the moving average normalised by its own (as
    the USB benchmark's ``entropy_loss``, whose sign and weight it keeps)."""
    probs = logits.softmax(dim=1)
    hist = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1]).to(probs.dtype)
    hist = hist / hist.sum()
    target = class_mean * torch.nan_to_num(1 / class_share, posinf=0.0)
    target = target / target.sum()
    mean = probs.mean(dim=0) * torch.nan_to_num(1 / hist, posinf=0.0)
    mean = mean / mean.sum()
    return (target * torch.log(mean + 1e-12)).sum()


# ----------------------------------------------------------------------------- the model


class ConsistencyModel(nn.Module):
    """What consistency training updates: the classifier, the thresholds' state and, with a reconstruction
    weight, the autoencoder of the same encoder. ``forward`` is the whole step's computation in one call (one
    forward per step for DistributedDataParallel) and returns the loss and its terms."""

    def __init__(
        self,
        clf: Classifier,
        spec: ConsistencySpec,
        images: int,
        truth: torch.Tensor | None = None,
        objective: Objective | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.clf, self.spec = clf, spec
        self.thresholds = Thresholds(spec, clf.config.num_classes, images)
        device = next(clf.parameters()).device
        self.thresholds.to(device)
        self.register_buffer("truth", None if truth is None else truth.to(device), persistent=False)
        self.ae: AutoEncoder | None = None
        self.objective = objective
        if spec.reconstruction:
            assert objective is not None, "the reconstruction term needs a pretraining objective"
            self.ae = shared_autoencoder(clf, decoder)

    def forward(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        lx: torch.Tensor,
        ly: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss and its terms for the unlabelled ``x`` (at positions ``idx`` of their set) beside the
        labelled ``lx``, ``ly``; every view drawn from ``generator``, the labelled one first."""
        s, clf = self.spec, self.clf
        lx = augment(lx, s.weak, generator)
        weak = augment(x, s.weak, generator)
        strong = strong_augment(augment(x, s.weak, generator), s.strong, generator)
        with torch.no_grad():  # targets, not gradients; its statistics are the running ones
            probs = clf(weak).float().softmax(dim=1)
        mask = self.thresholds(probs, idx)
        pseudo = probs.argmax(dim=1)
        passed = mask.nonzero().flatten()
        with corrupted(clf, 0.0, None):  # the running statistics stay the weak views'
            logits = clf(torch.cat([lx, strong[passed]]).contiguous(memory_format=torch.channels_last)).float()
        supervised = F.cross_entropy(logits[: len(lx)], ly, label_smoothing=s.label_smoothing)
        # FixMatch's mean over the whole unlabelled batch: those below the threshold count as zero
        consistency = F.cross_entropy(logits[len(lx) :], pseudo[passed], reduction="sum") / len(x)
        loss = supervised + s.weight * consistency
        terms = {"supervised": supervised, "consistency": consistency, "mask": mask.float().mean()}
        if s.policy == "free" and s.fairness:
            th = self.thresholds
            fair = (
                fairness_loss(logits[len(lx) :], th.class_mean, th.class_share) if len(passed) else loss.new_zeros(())
            )
            loss, terms["fairness"] = loss + s.fairness * fair, fair
        if self.ae is not None:
            assert self.objective is not None
            with corrupted(self.ae, 0.0, None):
                rec = self.objective.loss(self.ae, weak, generator)
            loss, terms["reconstruction"] = loss + s.reconstruction * rec, rec
        if self.truth is not None:  # the share that passed with the right label: over "mask", their accuracy
            terms["mask_correct"] = ((pseudo == self.truth[idx]) & mask).float().mean()
        return {"loss": loss, **terms}


class ConsistencyLoss:
    """The training loop's criterion for a :class:`ConsistencyModel` (also under DDP or compiled) on a
    :class:`Batch` of unlabelled images (their positions as ``y``) with its ``labelled`` batch. It augments
    both itself (``augments``): the loop passes them as they are stored."""

    random, augments = True, True
    ratios = {"pseudo_accuracy": ("mask_correct", "mask")}  # of the pseudo-labels that passed, over the epoch

    def __call__(
        self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        lab = batch.labelled
        assert lab is not None and lab.y is not None, "consistency training reads a labelled batch beside every batch"
        assert batch.y is not None, "consistency training reads the unlabelled images' positions"
        return model(batch.x, batch.y, lab.x, lab.y, generator)


def weak_augmentation(cfg) -> AugmentConfig:
    """The weak view: the run's crop, flip and jitter without Cutout; crop (its padding, 4 when the run has none)
    and flip even where the run augments nothing, as every method of the family has them."""
    weak = cfg.augment_config(True) if cfg.augment else AugmentConfig(crop_padding=cfg.crop_padding or 4)
    return replace(weak, cutout=0, flip=True, crop_padding=weak.crop_padding or 4)


def consistency_training(
    clf: Classifier,
    unlabelled: ImageSet,
    labelled: ImageSet,
    classes: list[str],
    cfg,
    device: torch.device,
    policy: str,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    decoder: nn.Module | None = None,
):
    """What a consistency phase trains and reads: the :class:`ConsistencyModel` around ``clf``, the unlabelled
    batches (``cfg.unlabelled_ratio`` times ``cfg.batch_size`` images, their positions as labels) an epoch walks,
    the criterion, and the labelled stream (batches of ``cfg.batch_size``). Under DDP both are sharded by rank."""
    assert labelled.labels is not None
    check_labels(labelled.labels, classes, "consistency training")
    spec = ConsistencySpec(
        policy,
        cfg.consistency_threshold,
        cfg.joint_weight,
        cfg.threshold_momentum,
        cfg.fairness_weight,
        cfg.reconstruction_weight,
        cfg.label_smoothing,
        weak_augmentation(cfg),
        StrongAugment(cfg.strong_ops, cfg.strong_cutout),
    )
    objective = make_objective(cfg.objective_config()) if spec.reconstruction else None
    model = ConsistencyModel(clf, spec, len(unlabelled), unlabelled.labels, objective, decoder)
    train = DeviceBatches.of(
        unlabelled,
        device,
        cfg.batch_size * cfg.unlabelled_ratio,
        labels=False,
        shuffle=True,
        seed=seed,
        rank=rank,
        world_size=world_size,
        placement=cfg.placement,
    ).indexed()
    return model, train, ConsistencyLoss(), labelled_stream(labelled, cfg, device, seed, rank, world_size)


class _Consistency(TrainingMode):
    unlabelled, frozen_encoder = True, False
    policy = ""

    def check(self, cfg) -> None:
        # label smoothing S trains the top probability towards 1 - S + S/k (k classes, at most 1 - S/2): a fixed
        # threshold above that is never passed, and the run would be supervised training that says otherwise
        cap = 1 - cfg.label_smoothing / 2
        if self.policy in ("fixed", "flex") and cfg.label_smoothing and cfg.consistency_threshold >= cap:
            raise ConvaeError(
                f"--joint {self.name}: label smoothing {cfg.label_smoothing:g} keeps every prediction's confidence "
                f"below {cap:g}, so the threshold {cfg.consistency_threshold:g} would never pass",
                advice="use --label-smoothing 0 (as FixMatch trains), or a lower --consistency-threshold",
            )

    def build(self, clf, labelled, unlabelled, classes, cfg, device, seed, rank=0, world_size=1, decoder=None):
        assert unlabelled is not None, "consistency training needs the unlabelled images"
        return consistency_training(
            clf, unlabelled, labelled, classes, cfg, device, self.policy, seed, rank, world_size, decoder
        )

    def describe(self, cfg, labelled: int, batches) -> str:
        unused = epoch_images_unused(cfg)
        return (
            f"consistency training ({cfg.joint}, weight {cfg.joint_weight:g}): batches of {cfg.batch_size} of the "
            f"{labelled} labelled images cycle beside {cfg.unlabelled_ratio} times as many unlabelled ones, "
            f"{batches.describe()}{unused}"
        )


@register_training_mode
class FixMatch(_Consistency):
    name, label, policy = "fixmatch", "FixMatch", "fixed"


@register_training_mode
class FlexMatch(_Consistency):
    name, label, policy = "flexmatch", "FlexMatch", "flex"


@register_training_mode
class FreeMatch(_Consistency):
    name, label, policy = "freematch", "FreeMatch", "free"
