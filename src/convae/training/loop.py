"""The training loop: optimiser and schedule factories, criteria, ``train_step``, ``train_one_epoch``.

Plain PyTorch, as torchvision's references: nothing here knows about run folders, phases or
the command line. A criterion is ``criterion(model, batch, generator)`` on a :class:`~convae.utils.records.Batch`,
returning the loss, or a mapping of ``"loss"`` (what is minimised) and named terms that the loop
sums over an epoch and the run records, prints and plots (``train_<name>``): it runs the forward
pass itself, so a pretraining objective can corrupt the input or act on the code, and a step that
mixes two streams reads both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DeviceBatches
from ..data.augment import AugmentConfig, augment, step_generator
from ..models.autoencoder import batch_norms
from ..utils import cores
from ..utils.device import autocast
from ..utils.errors import ConvaeError
from ..utils.records import Batch


class Criterion(Protocol):
    """What the loop calls every step: ``criterion(model, batch, generator)`` on a :class:`Batch`, returning
    the loss, or a mapping of ``"loss"`` and named terms. An objective, a closure or a training mode's
    criterion; one that draws from the step's generator says so with ``random = True`` (a closure need not:
    no generator is made for it); one that makes its own views of the batches with ``augments = True`` (the
    loop then passes them as stored); ``ratios = {name: (numerator, denominator)}`` adds terms that are the
    ratio of two of its terms over the epoch."""

    def __call__(
        self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None, /
    ) -> torch.Tensor | Mapping[str, torch.Tensor]: ...


def _sum_terms(out, terms: dict[str, torch.Tensor] | None, images: int) -> torch.Tensor:
    """The loss a criterion returned; its named terms (when it returned a mapping) summed over ``images``
    into ``terms``."""
    if not isinstance(out, Mapping):
        return out
    if terms is not None:
        for name, value in out.items():
            if name != "loss":
                terms[name] = terms.get(name, 0) + value.detach().double() * images
    return out["loss"]


def make_optimizer(
    params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam (the lecture's), AdamW, or SGD with momentum 0.9 (``nesterov``: Nesterov's), over the
    parameters that train."""
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=name == "nesterov")


def schedule(
    name: str,
    epochs: int,
    step_size: int = 30,
    steps_per_epoch: int = 1,
    warmup: float = 0.0,
    total_steps: int | None = None,
) -> Callable[[int], float] | None:
    """The learning rate's factor for global step ``step`` (0-based, the step about to be taken); None for
    a constant rate (the lecture's). ``cosine`` and ``step`` change at epoch boundaries (cosine annealing to
    zero over ``epochs``; 10x down every ``step_size`` epochs); ``triangle`` every step: a linear warm-up over
    the first ``warmup`` of the ``epochs * steps_per_epoch`` steps (or ``total_steps``, when the last epoch
    stops early), then a linear decay that reaches zero after the last (the fast CIFAR-10 baselines')."""
    per_epoch = max(steps_per_epoch, 1)
    if name == "cosine":
        return lambda step: (1 + math.cos(math.pi * (step // per_epoch) / max(epochs, 1))) / 2
    if name == "step":
        return lambda step: 0.1 ** ((step // per_epoch) // step_size)
    if name == "triangle":
        total = max(total_steps or epochs * steps_per_epoch, 1)
        rise = max(round(warmup * total), 1)
        return lambda step: (step + 1) / rise if step < rise else max(total - step, 0) / max(total - rise + 1, 1)
    return None


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    epochs: int,
    step_size: int = 30,
    steps_per_epoch: int = 1,
    warmup: float = 0.0,
    total_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The :func:`schedule` as a ``LambdaLR``, stepped after every optimizer step: its state is the global
    step, so a resumed run restores it and nothing else."""
    factor = schedule(name, epochs, step_size, steps_per_epoch, warmup, total_steps)
    return None if factor is None else torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_at(optimizer: torch.optim.Optimizer, scheduler, step: int) -> float:
    """The learning rate of global step ``step`` (what an epoch's record shows for its first step)."""
    if scheduler is None:
        return optimizer.param_groups[0]["lr"]
    return optimizer.param_groups[0]["initial_lr"] * scheduler.lr_lambdas[0](step)


def freeze(module: nn.Module) -> None:
    """No gradients for ``module`` (the linear probe trains the head alone)."""
    for p in module.parameters():
        p.requires_grad_(False)


def train_mode(model: nn.Module) -> None:
    """``model.train()``, except that frozen batch norms stay in eval mode: a frozen encoder keeps
    its running statistics and gives the same features in training as in evaluation."""
    model.train()
    for m in batch_norms(model):
        if not any(p.requires_grad for p in m.parameters()):
            m.eval()


def classification_loss(label_smoothing: float = 0.0) -> Criterion:
    """Cross-entropy of the model's logits (float32 under autocast), with label smoothing."""

    def criterion(model: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        return F.cross_entropy(model(batch.x).float(), batch.y, label_smoothing=label_smoothing)

    return criterion


classification_criterion = classification_loss()  # the plain cross-entropy (the lecture's)


def check_finite(loss: float, what: str, where: str, saved: str = "") -> None:
    """The NaN guard: a loss that is NaN or infinite stops training with one line (never saved)."""
    if not math.isfinite(loss):
        raise ConvaeError(
            f"the {what} loss became {loss} {where}; stopped{f' ({saved})' if saved else ''}",
            advice="try a lower --lr or --precision fp32",
        )


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    criterion: Criterion,
    precision: str = "fp32",
    micro_batch: int | None = None,
    global_n: int | None = None,
    world_size: int = 1,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    terms: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the loss summed over its images, on the device, and adds
    the criterion's named terms, summed the same way, to ``terms``.

    With ``micro_batch`` the gradient is accumulated over chunks of that many images before
    the one step: the same update as the whole batch (up to float rounding), but a chunk's
    activations stay in the CPU's caches. Under DDP ``x`` is this rank's shard of a global
    batch of ``global_n`` images; scaling by ``world_size / global_n`` undoes DDP's averaging,
    so the update is the global batch's mean gradient even for uneven shards. With ``scaler``
    (fp16) the gradient is scaled up before the backward pass and the step is skipped, and the
    scale lowered, when it overflowed.
    """
    optimizer.zero_grad(set_to_none=True)
    device = batch.x.device
    scale = world_size / (global_n or len(batch))
    total = torch.zeros((), device=device, dtype=torch.float64)
    chunks = list(batch.chunks(micro_batch or 0))
    for i, part in enumerate(chunks):
        # DDP all-reduces on the last chunk's backward only
        sync = nullcontext() if i == len(chunks) - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with (
                autocast(device, precision),
                _one_image_batch_norm(len(part), len(batch), global_n or len(batch), world_size),
            ):
                loss = _sum_terms(criterion(model, part, generator), terms, len(part))
            weighted = loss * (len(part) * scale)
            (weighted if scaler is None else scaler.scale(weighted)).backward()
        total += loss.detach().double() * len(part)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return total


def keep_last_batch_trainable(model: nn.Module, batches: DeviceBatches) -> DeviceBatches:
    """A network with batch norm cannot train on one image per channel: an epoch whose remainder would
    leave a rank fewer than two images reads it with the batch before (every image still seen once).
    Called before anything counts ``len(batches)`` (the schedules); returns ``batches``."""
    if batch_norms(model):
        batches.min_last = max(batches.min_last, 2 * batches.world_size)
    return batches


@contextmanager
def _one_image_batch_norm(images: int, shard: int, global_n: int, world_size: int):
    """torch's batch norm refuses a training batch with one value per channel (one image on a 1x1
    map, or before a BatchNorm1d): said in convae's terms, with the setting to change. A short last
    batch never gets here (:func:`keep_last_batch_trainable`); a micro-batch of one image, a global
    batch smaller than two images per process, or a training set of one image does."""
    try:
        yield
    except ValueError as e:
        if "more than 1 value per channel" not in str(e):
            raise
        if images < shard:
            advice = "use --micro-batch 2 or more (or leave it unset)"
        elif world_size > 1:  # a strided shard of a global batch of 2 per process holds 2
            advice = (
                f"a batch of {global_n} image(s) over {world_size} processes leaves this one {shard}: "
                f"use --batch-size {2 * world_size} or more (and at least that many training images)"
            )
        else:
            advice = "train on at least 2 images, with --batch-size 2 or more"
        raise ConvaeError(
            f"a training batch of {images} image(s) is too small for the network's batch norm "
            "(it needs two values per channel)",
            advice=advice,
        ) from None


class EpochInterrupted(Exception):
    """Raised by :func:`train_one_epoch` after the step in flight when a stop was asked for."""

    def __init__(self, step: int, loss_sum: float) -> None:
        super().__init__(f"stopped after step {step}")
        self.step, self.loss_sum = step, loss_sum
        # filled in by the epoch loop (convae.training.fit.train_epochs) on its way up, for the saved state
        self.epoch, self.seconds, self.terms = 0, 0.0, {}


@dataclass(frozen=True)
class StepSettings:
    """What every step of a phase or a sweep cell shares beside the model, optimizer and criterion."""

    precision: str = "fp32"
    micro_batch: int | None = None  # passed to train_step: the gradient accumulated over chunks of this many
    augmentation: AugmentConfig | None = None  # every step's batch (and its labelled one) augmented so
    seed: int = 0  # with (epoch, step, rank), the seed of every step's generator
    scaler: torch.amp.GradScaler | None = None  # fp16's gradient scaler, passed to train_step
    after_step: Callable[[], None] | None = None  # after every optimizer step: the schedule, the weight average


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    optimizer: torch.optim.Optimizer,
    criterion: Criterion,
    settings: StepSettings | None = None,
    desc: str = "train",
    start_step: int = 0,
    loss_sum: float = 0.0,
    should_stop: Callable[[], bool] | None = None,
    max_steps: int | None = None,
    labelled: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None,
    terms: dict[str, torch.Tensor] | None = None,
) -> float:
    """One pass over ``batches`` (or its first ``max_steps`` steps); returns the mean loss per image
    over the images it trained on. ``terms`` gathers the criterion's named terms: summed into it over
    the epoch (a resumed epoch passes the sums it stopped with), each the mean per image at the end.

    ``start_step`` and ``loss_sum`` continue an interrupted epoch; ``should_stop`` is polled after
    every step. Each step's random numbers (augmentation, the objective's corruption) come from a
    generator seeded by (``settings.seed``, epoch, step, rank), so a resumed epoch replays the same
    batches exactly. With ``labelled`` (an endless iterator of labelled batches) every step's batch
    carries the next of them too, augmented like the main one.
    """
    from tqdm.auto import tqdm

    train_mode(model)
    device = keep_last_batch_trainable(model, batches).device
    total = torch.full((), loss_sum, device=device, dtype=torch.float64)  # summed on the device: no sync per step
    bar = tqdm(
        batches.iterate(start_step),
        desc=desc,
        unit="batch",
        leave=False,
        disable=None,
        total=len(batches),
        initial=start_step,
    )
    # a generator only when something draws from it: the seed recipe's loop stays as it was
    settings = settings or StepSettings()
    # a criterion that augments its batches itself (two views of an image) takes them as stored
    augmentation = None if getattr(criterion, "augments", False) else settings.augmentation
    needs_rng = settings.augmentation is not None or getattr(criterion, "random", False)
    images = 0
    for step, (x, y) in enumerate(bar, start=start_step + 1):
        # ranks draw different numbers for their different shards (7919: any prime apart from 1)
        g = step_generator(device, settings.seed + 7919 * batches.rank, batches.epoch, step) if needs_rng else None
        side = None
        if labelled is not None:
            lx, ly = next(labelled)
            side = Batch(augment(lx, augmentation, g) if augmentation is not None else lx, ly)
        if augmentation is not None:
            x = augment(x, augmentation, g)
        total += train_step(
            model,
            Batch(x, y, side),
            optimizer,
            criterion,
            settings.precision,
            settings.micro_batch,
            batches.global_size(step - 1),
            batches.world_size,
            g,
            settings.scaler,
            terms,
        )
        images += batches.global_size(step - 1)
        cores.poll()
        if settings.after_step is not None:
            settings.after_step()
        stopping = should_stop is not None and should_stop()
        if stopping or (max_steps is not None and step - start_step >= max_steps):
            bar.close()
            if stopping:
                raise EpochInterrupted(step, float(total))
            break
    names = sorted(terms or {})
    if batches.world_size > 1:  # every rank saw its shard: the epoch's loss is the sum over ranks
        summed = torch.stack([total, *(torch.as_tensor(terms[k], dtype=torch.float64, device=device) for k in names)])
        torch.distributed.all_reduce(summed)
        total = summed[0]
        terms.update(zip(names, summed[1:]))
    denominator = batches.num_images if max_steps is None else max(images, 1)
    for k in names:
        terms[k] = float(terms[k]) / denominator
    # a criterion's ratios of two terms (a share of a share), from the epoch's sums: exact over steps and ranks
    for k, (num, den) in getattr(criterion, "ratios", {}).items():
        if terms is not None and num in terms and den in terms:
            terms[k] = terms[num] / terms[den] if terms[den] else 0.0
    return float(total) / denominator
