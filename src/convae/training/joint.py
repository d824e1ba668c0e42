"""Semi-supervised training: the autoencoder's cost and the classifier's, in every step at once.

Pretraining then fine-tuning spends the unlabelled images once, before a label is seen. Here every
step reads a batch of the unlabelled stream (an epoch is one pass over it) and the next batch of the
labelled set, which cycles (each pass in its own order); the loss is the cross-entropy on the
labelled batch plus ``joint_weight`` times an unsupervised cost. Two variants:

- ``plain``: the configured pretraining objective (reconstruct, denoise, masked, sparse) on the
  unlabelled and the labelled images together, through the decoder; the encoder is shared by the
  decoder and the head (so every architecture with a decoder trains this way); the running
  batch-norm statistics are the classification pass's (a masked input's are not a clean image's);
- ``gamma``: the Ladder network's Gamma-model (Rasmus et al. 2015). A clean and a corrupted pass of
  the classifier (Gaussian noise of std ``joint_noise`` after every batch norm and on the top layer,
  and on the input relative to the pixels' spread, as the paper's is on whitened images); the
  corrupted pass's top layer (the logits, batch-normalised) is denoised by the paper's per-unit
  "gauss" combinator towards the clean pass's, on the unlabelled images; the cross-entropy is the
  corrupted pass's; predictions are the clean network's. As in the paper's code the labelled and the
  unlabelled images are normalised with their own batch statistics, the corrupted passes leave the
  running statistics alone, and the clean target is not detached (``joint_stop_grad`` detaches it,
  as the Pi-model and mean teacher do). One difference: the running statistics come from the clean
  pass of the unlabelled batch (the paper's code runs a clean labelled pass for them; the unlabelled
  batch is a larger sample of the same images, and the pass is one fewer).

With ``joint_weight`` 0 no unsupervised cost is computed: the step is supervised training's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config.modes import TrainingMode, register_training_mode
from ..data import DeviceBatches, ImageSet
from ..models import AutoEncoder, Classifier
from ..models.autoencoder import batch_norms
from ..models.objectives import Objective, make_objective
from ..utils.errors import ConvaeError
from ..utils.records import Batch

# ----------------------------------------------------------------------------- the model


class GaussCombinator(nn.Module):
    """The Ladder's "gauss" denoising function, per unit: ``(z - mu(u)) * v(u) + mu(u)`` with
    ``mu(u) = a1 sigmoid(a2 u + a3) + a4 u + a5`` and ``v`` alike; initialised as the paper's code."""

    def __init__(self, units: int) -> None:
        super().__init__()
        init = torch.zeros(10, units)
        init[[1, 6]] = 1.0  # a2 and a7
        self.a = nn.Parameter(init)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        a = self.a
        mu = a[0] * torch.sigmoid(a[1] * u + a[2]) + a[3] * u + a[4]
        v = a[5] * torch.sigmoid(a[6] * u + a[7]) + a[8] * u + a[9]
        return (z - mu) * v + mu


def shared_autoencoder(clf: Classifier, decoder: nn.Module | None = None) -> AutoEncoder:
    """An autoencoder whose encoder is ``clf``'s (one module, two heads), with a copy of ``decoder`` (a pretrained
    autoencoder's, which is left as it was) or a fresh one, on ``clf``'s device."""
    ae = AutoEncoder(clf.config)
    ae.encoder = clf.encoder
    if decoder is not None:
        ae.decoder = copy.deepcopy(decoder)
    ae.decoder.to(next(clf.parameters()).device, memory_format=torch.channels_last)
    return ae


@contextmanager
def corrupted(model: nn.Module, std: float, generator: torch.Generator | None) -> Iterator[None]:
    """Inside the block ``model``'s batch norms add Gaussian noise of ``std`` to their outputs (none
    for 0) and leave their running statistics alone (the clean pass's are the ones evaluation uses)."""
    norms = batch_norms(model)
    momenta = [m.momentum for m in norms]

    def noisy(module, inputs, out):
        return out + std * torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)

    hooks = [m.register_forward_hook(noisy) for m in norms] if std > 0 else []
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for h in hooks:
            h.remove()


def _normalised(z: torch.Tensor) -> torch.Tensor:
    """``z`` (B, K) batch-normalised per unit (no scale or shift)."""
    return (z - z.mean(0, keepdim=True)) / (z.var(0, unbiased=False, keepdim=True) + 1e-6).sqrt()


def _noise(x: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    return std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class JointSpec:
    """One variant of joint training and its knobs."""

    mode: str  # "plain" or "gamma"
    weight: float = 1.0
    noise: float = 0.3
    stop_grad: bool = False
    label_smoothing: float = 0.0


class JointModel(nn.Module):
    """What joint training updates: the classifier and, for ``plain``, the autoencoder of the same
    encoder and the architecture's decoder, for ``gamma`` the denoising function. ``forward`` is the
    whole step's computation in one call (so DistributedDataParallel sees one forward per step) and
    returns the supervised and the unsupervised cost; with weight 0 it has no decoder or combinator
    and the unsupervised cost is 0: the step is supervised training's."""

    def __init__(
        self, clf: Classifier, spec: JointSpec, objective: Objective | None = None, decoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        if spec.mode not in ("plain", "gamma"):
            raise ValueError(f"unknown joint mode {spec.mode!r}")
        self.clf, self.spec, self.objective = clf, spec, objective
        self.ae: AutoEncoder | None = None
        self.combinator: GaussCombinator | None = None
        device = next(clf.parameters()).device
        if spec.weight and spec.mode == "plain":
            assert objective is not None, "plain joint training needs a pretraining objective"
            self.ae = shared_autoencoder(clf, decoder)
        elif spec.weight:
            self.combinator = GaussCombinator(clf.config.num_classes).to(device)

    def forward(
        self, x: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy of the labelled ``lx``, ``ly``; unsupervised cost) for unlabelled ``x``."""
        s = self.spec
        if self.combinator is not None:
            return self._gamma(x, lx, ly, generator)
        ce = F.cross_entropy(self.clf(lx).float(), ly, label_smoothing=s.label_smoothing)
        if self.ae is None:
            return ce, ce.new_zeros(())
        assert self.objective is not None
        both = torch.cat([x, lx]).contiguous(memory_format=torch.channels_last)
        # a masked or noisy input's statistics are not the clean images': evaluation keeps the clean pass's
        with corrupted(self.ae, 0.0, generator):
            return ce, self.objective.loss(self.ae, both, generator)

    def _gamma(
        self, x: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.combinator is not None
        s, clf = self.spec, self.clf
        # clean pass of the unlabelled images: the target (and the running statistics evaluation uses)
        target = _normalised(clf(x).float())
        if s.stop_grad:
            target = target.detach()
        # the input noise is relative to the images' spread, as the paper's on whitened images
        scale = x.detach().float().std(dim=(0, 2, 3), keepdim=True).to(x.dtype)
        with corrupted(clf, s.noise, generator):
            noisy_u = clf((x + _noise(x, s.noise, generator) * scale).contiguous(memory_format=torch.channels_last))
            noisy_l = clf((lx + _noise(lx, s.noise, generator) * scale).contiguous(memory_format=torch.channels_last))
        ce = F.cross_entropy(noisy_l.float(), ly, label_smoothing=s.label_smoothing)
        z = _normalised(noisy_u.float())
        z = z + _noise(z, s.noise, generator)
        u = _normalised(torch.softmax(noisy_u.float(), dim=1))  # the top's "vertical" input: its prediction
        return ce, (self.combinator(z, u) - target).pow(2).mean()


class JointLoss:
    """The training loop's criterion for a :class:`JointModel` (also under DDP or compiled) on a
    :class:`Batch` of unlabelled images with its ``labelled`` batch: the cross-entropy plus the
    weighted unsupervised cost, and each term by name for the epoch's record."""

    random = True  # augmentation, the objective's corruption, the Gamma-model's noise

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(
        self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        lab = batch.labelled
        assert lab is not None and lab.y is not None, "joint training reads a labelled batch beside every batch"
        ce, unsup = model(batch.x, lab.x, lab.y, generator)
        return {"loss": ce + self.weight * unsup, "supervised": ce, "unsupervised": unsup}


# ----------------------------------------------------------------------------- the labelled stream


def cycling(batches: DeviceBatches, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The labelled set's batches without end, pass after pass (pass ``e`` in the order of epoch
    ``e``), from batch ``start`` of the whole stream: a resumed run continues it where it was."""
    n = len(batches)
    passes, step = divmod(start, n)
    while True:
        batches.set_epoch(passes + 1)
        yield from batches.iterate(step)  # type: ignore[misc]
        passes, step = passes + 1, 0


def labelled_stream(labelled: ImageSet, cfg, device: torch.device, seed: int, rank: int = 0, world_size: int = 1):
    """The labelled set beside an unlabelled stream, in batches of ``cfg.batch_size``, cycling: a function of
    the batch of the whole stream it starts at. In its own order (seed + 1): the labelled images are among the
    unlabelled ones, and would come in step."""
    side = DeviceBatches.of(
        labelled,
        device,
        cfg.batch_size,
        shuffle=True,
        seed=seed + 1,
        rank=rank,
        world_size=world_size,
        placement=cfg.placement,
    )
    return lambda start: cycling(side, start)


def epoch_images_unused(cfg) -> str:
    """What the log says of ``--epoch-images`` under a mode whose epoch is one pass over the unlabelled images."""
    if not cfg.epoch_images:
        return ""
    return f"; --epoch-images {cfg.epoch_images} is not used: an epoch is one pass over the unlabelled images"


def check_labels(labels: torch.Tensor, classes: list[str], what: str = "joint training") -> None:
    """A class with no labelled image cannot be learnt from the labels: said, not trained around."""
    counts = torch.bincount(labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
    if empty:
        raise ConvaeError(
            f"{what}: class(es) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} have no labelled image",
            advice="give every class at least one labelled image",
        )


def joint_training(
    clf: Classifier,
    unlabelled: ImageSet,
    labelled: ImageSet,
    classes: list[str],
    cfg,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
    decoder: nn.Module | None = None,
):
    """What a joint phase trains and reads, for a run and a sweep cell alike: the :class:`JointModel`
    around ``clf`` (``plain``: with a copy of ``decoder`` when given, a pretrained one), the unlabelled
    batches an epoch walks, the criterion, and the labelled stream (a function of the batch of the
    whole stream it starts at). Under DDP both are sharded by rank."""
    assert labelled.labels is not None
    check_labels(labelled.labels, classes)
    seed = cfg.seed if seed is None else seed
    spec = JointSpec(cfg.joint, cfg.joint_weight, cfg.joint_noise, cfg.joint_stop_grad, cfg.label_smoothing)
    model = JointModel(clf, spec, make_objective(cfg.objective_config()) if cfg.joint == "plain" else None, decoder)
    train = DeviceBatches.of(
        unlabelled,
        device,
        cfg.batch_size,
        labels=False,
        shuffle=True,
        seed=seed,
        rank=rank,
        world_size=world_size,
        placement=cfg.placement,
    )
    return model, train, JointLoss(spec.weight), labelled_stream(labelled, cfg, device, seed, rank, world_size)


class _Joint(TrainingMode):
    unlabelled, frozen_encoder = True, False

    def build(self, clf, labelled, unlabelled, classes, cfg, device, seed, rank=0, world_size=1, decoder=None):
        assert unlabelled is not None, "joint training needs the unlabelled images"
        return joint_training(clf, unlabelled, labelled, classes, cfg, device, rank, world_size, seed, decoder)

    def describe(self, cfg, labelled: int, batches) -> str:
        return (
            f"joint training ({cfg.joint}, weight {cfg.joint_weight:g}): the {labelled} labelled images cycle "
            f"beside the unlabelled stream, {batches.describe()}{epoch_images_unused(cfg)}"
        )


@register_training_mode
class Plain(_Joint):
    name, label = "plain", "plain (objective + cross-entropy)"
    pretrained_method = "joint_finetune"


@register_training_mode
class Gamma(_Joint):
    name, label = "gamma", "Gamma-model (Ladder)"
