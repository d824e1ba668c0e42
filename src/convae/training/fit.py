"""``fit``: epochs of the loop with validation, logging, resume, the NaN guard and clean stops.

The run's shared state travels in a :class:`RunContext`; the training state is saved to
``checkpoints/state.pt`` after every epoch (and on SIGINT/SIGTERM after the step in flight),
and ``fit`` continues from it when the run is resumed.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import Config
from ..data import DeviceBatches
from ..models.autoencoder import batch_norms
from ..outputs.checkpoint import atomic_torch_save, is_state_dict, load_state_strict
from ..outputs.rundir import Heartbeat, RunDir, TensorBoardLog, epoch_line
from ..utils.device import grad_scaler, micro_batch_size
from ..utils.distributed import Dist
from ..utils.errors import ConvaeError, Interrupted, clip, first_line
from ..utils.files import refuse_links
from ..utils.records import EpochRecord, Log, TrainingState, Validation
from .loop import (
    Criterion,
    EpochInterrupted,
    StepSettings,
    check_finite,
    keep_last_batch_trainable,
    lr_at,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from .recipe import WeightAverage, step_hook

STATE_FORMAT = "convae-state"


class StopFlag:
    """Set by SIGINT/SIGTERM: training finishes the step in flight, saves, and stops."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only live in the main thread
            return

        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.signum = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@dataclass
class RunContext:
    """What the phases share: the run folder, config, log, the metrics so far, resume state."""

    run: RunDir
    cfg: Config
    log: Log
    metrics: list[EpochRecord] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    resume: TrainingState | None = None  # the saved state.pt, when continuing a run
    stop: StopFlag = field(default_factory=StopFlag)
    tb: TensorBoardLog | None = None
    dist: Dist = field(default_factory=Dist)
    on_epoch: Callable[[EpochRecord], None] | None = None  # the Python API's per-epoch callback

    def check_stop(self, where: str) -> None:
        """Stop here when a signal came in since the last epoch (the state is already saved)."""
        if self.stop():
            raise Interrupted(self.stop.signum, where, str(self.run.path))

    def record(self, rec: EpochRecord) -> None:
        """One epoch's metrics: kept on every rank, written and printed by rank 0."""
        self.metrics.append(rec)
        if self.dist.is_main:
            self.run.log_metrics(rec)
            if self.on_epoch is not None:
                self.on_epoch(rec)
            self.log(epoch_line(rec))
            if self.tb is not None:
                self.tb.scalars(rec)

    def resumed(self, phase: str) -> TrainingState | None:
        return self.resume if self.resume is not None and self.resume["phase"] == phase else None

    def history(self, phase: str) -> list[EpochRecord]:
        return [m for m in self.metrics if m["phase"] == phase]

    def save_state(
        self,
        phase: str,
        model: nn.Module,
        optimizer,
        scheduler,
        epoch: int,
        step: int,
        loss_sum: float,
        elapsed: float,
        kernels: torch.Tensor,
        average: WeightAverage | None = None,
        scaler=None,
        terms: dict | None = None,
    ) -> None:
        """Everything needed to continue after ``epoch`` completed epochs and ``step`` more batches."""
        if not self.dist.is_main:
            return
        state: TrainingState = {
            "format": STATE_FORMAT,
            "phase": phase,
            "epoch": epoch,
            "step": step,
            "loss_sum": loss_sum,
            "elapsed": elapsed,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": torch.get_rng_state(),
            "metrics": list(self.metrics),
            "timing": dict(self.timing),
            "kernels": kernels.detach().cpu(),
            "config": self.cfg.to_dict(),
            "average": average.state_dict() if average is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "terms": terms,  # the loss terms summed so far in the epoch stopped mid-way
        }
        path = self.run.checkpoints / "state.pt"
        atomic_torch_save(state, path)  # a failed write: one ConvaeError, the previous state intact


def read_state(run: RunDir) -> TrainingState | None:
    """The saved training state of a run folder, or None when no epoch has been saved yet."""
    path = refuse_links(run.path, run.checkpoints / "state.pt")
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConvaeError(
            f"{path} cannot be read ({first_line(e)}); this run cannot be continued",
            advice="start a new run with another --out",
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConvaeError(f"{path} is not a convae training state")
    bad = [key for key, ok in _STATE_CHECKS.items() if key not in state or not ok(state[key])]
    if bad:
        raise ConvaeError(
            f"{path} is a damaged training state ({', '.join(bad)}); this run cannot be continued",
            advice="start a new run with another --out",
        )
    return state  # type: ignore[return-value]


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# every field of a state.pt, and what it must be: the file is read back as untrusted
_STATE_CHECKS: dict[str, Callable[[object], bool]] = {
    "phase": lambda v: v in ("pretrain", "finetune"),
    "epoch": _is_count,
    "step": _is_count,
    "loss_sum": lambda v: isinstance(v, float),
    "elapsed": lambda v: isinstance(v, float),
    "model": is_state_dict,
    "optimizer": lambda v: isinstance(v, dict),
    "scheduler": lambda v: v is None or isinstance(v, dict),
    "rng": lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8,
    "metrics": lambda v: isinstance(v, list) and all(isinstance(m, dict) and "phase" in m for m in v),
    "timing": lambda v: isinstance(v, dict) and all(isinstance(x, float) for x in v.values()),
    "kernels": lambda v: isinstance(v, torch.Tensor),
}


@dataclass
class Resume:
    """Where a phase starts: its first epoch, and the step, loss sum, seconds and named terms' sums of the
    epoch a saved state stopped in (all zero for a fresh phase)."""

    epoch: int = 1
    step: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def _restore(
    ctx: RunContext, phase: str, model: nn.Module, optimizer, scheduler, average: WeightAverage | None, scaler=None
) -> Resume:
    """Weights, optimizer, scheduler and RNG from the saved state when ``phase`` is resumed; where it
    continues."""
    r = ctx.resumed(phase)
    if r is None:
        return Resume()
    where = str(ctx.run.checkpoints / "state.pt")
    load_state_strict(model, r["model"], source=where)
    try:
        optimizer.load_state_dict(r["optimizer"])
        if scheduler is not None and r["scheduler"] is not None:
            scheduler.load_state_dict(r["scheduler"])
        torch.set_rng_state(r["rng"])
        if average is not None:
            saved = r.get("average")
            if not isinstance(saved, dict) or set(saved.get("shadow", {})) != set(average.shadow):
                raise ValueError("no weight average saved for this model")
            average.load_state_dict(saved)
        if scaler is not None and isinstance(r.get("scaler"), dict):
            scaler.load_state_dict(r["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise ConvaeError(
            f"{where} does not match this run's optimizer ({clip(first_line(e), 80)})",
            advice="start a new run with another --out",
        ) from None
    return Resume(r["epoch"] + 1, r["step"], r["loss_sum"], r["elapsed"], _resumed_terms(r.get("terms"), r["step"]))


def optimisation(
    model: nn.Module,
    cfg: Config,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    ema: float,
    device: torch.device,
    total_steps: int | None = None,
):
    """What a phase's steps update, the same for a run's phase and a sweep cell: the optimizer, its
    schedule (stepped after every optimizer step; over ``total_steps`` when the last epoch stops
    early), the weight average (``ema`` > 0) and fp16's scaler."""
    optimizer = make_optimizer(model.parameters(), cfg.optimizer, lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.schedule, epochs, cfg.step_size, steps_per_epoch, cfg.warmup, total_steps)
    average = WeightAverage(model, ema) if ema else None
    return optimizer, scheduler, average, grad_scaler(cfg.precision, device)


@dataclass
class EpochEnd:
    """What an epoch left, for its caller's end-of-epoch work (validation, records, saving, curves)."""

    epoch: int
    loss: float  # mean per image
    terms: dict[str, float]  # each named term's mean per image
    seconds: float  # the epoch's, with those before a resume
    done: int  # optimizer steps of the phase so far
    lr: float  # the learning rate of the epoch's first step


def train_epochs(
    net: nn.Module,
    batches: DeviceBatches,
    optimizer,
    scheduler,
    criterion: Criterion,
    settings: StepSettings,
    epochs: int,
    end_of_epoch: Callable[[EpochEnd], None],
    beat: Heartbeat,
    total: int | None = None,
    resume: Resume | None = None,
    labelled: Callable[[int], Generator] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """The one epoch loop of every phase and sweep cell: epochs over ``batches`` until ``epochs`` (the
    last one cut at ``total`` optimizer steps of the whole phase), from ``resume``; ``end_of_epoch``
    gets each epoch's :class:`EpochEnd`. ``labelled(k)``: the labelled stream from its ``k``-th batch
    on, beside every step. A stop asked through ``should_stop`` raises :class:`EpochInterrupted` with
    the epoch, its seconds and its terms' sums added, for the caller to save."""
    r = resume or Resume()
    per_epoch = len(batches)
    total = epochs * per_epoch if total is None else total
    step, loss_sum, elapsed, terms = r.step, r.loss_sum, r.seconds, r.terms
    for epoch in range(r.epoch, epochs + 1):
        batches.set_epoch(epoch)
        beat.begin(epoch, step)
        first = (epoch - 1) * per_epoch  # the epoch's first step in the phase: the schedule's and the stream's
        lr, n = lr_at(optimizer, scheduler, first), min(total - first, per_epoch)
        side = labelled(first + step) if labelled is not None else None
        start = time.perf_counter()
        try:
            loss = train_one_epoch(
                net,
                batches,
                optimizer,
                criterion,
                settings,
                beat.desc(),
                step,
                loss_sum,
                should_stop,
                max_steps=None if n == per_epoch else n - step,
                labelled=side,
                terms=terms,
            )
        except EpochInterrupted as e:
            e.epoch, e.seconds, e.terms = epoch, elapsed + time.perf_counter() - start, terms
            raise
        finally:
            if side is not None:
                side.close()  # its prefetching thread ends with it
        seconds = elapsed + time.perf_counter() - start
        end_of_epoch(EpochEnd(epoch, loss, dict(terms), seconds, first + n, lr))
        step, loss_sum, elapsed, terms = 0, 0.0, 0.0, {}


def step_settings(
    cfg: Config, device: torch.device, classify: bool, seed: int, scaler, after_step: Callable[[], None]
) -> StepSettings:
    """The per-step settings of a phase or a sweep cell from the run's config: a new per-step option is
    set here (``classify``: the classifier's augmentation, Cutout included)."""
    micro = micro_batch_size(cfg.micro_batch, cfg.precision, device)
    return StepSettings(cfg.precision, micro, cfg.augment_config(classify), seed, scaler, after_step)


def fit(
    model: nn.Module,
    phase: str,
    batches: DeviceBatches,
    validate: Callable[[], Validation],
    criterion: Criterion,
    epochs: int,
    lr: float,
    ctx: RunContext,
    kernels: torch.Tensor,
    ema: float = 0.0,
    labelled: Callable[[int], Generator] | None = None,
) -> list[EpochRecord]:
    """Train for ``epochs``, validating, logging and saving the state at the end of each epoch.

    Continues from ``ctx.resume`` when it holds this phase. ``kernels`` (the first-layer
    kernels before this phase) travel in the saved state for the figures drawn at the end.
    With ``ema`` a moving average of the weights is kept (:class:`~convae.training.recipe.WeightAverage`):
    it is what validation sees, and ``model`` holds it when the phase ends. ``labelled(k)``: the labelled
    stream from its ``k``-th batch on, read beside every step (joint training).
    """
    cfg = ctx.cfg
    net = ctx.dist.wrap(model)  # trained through DDP when distributed; saved and validated unwrapped
    net = torch.compile(net) if cfg.compile else net
    steps = len(keep_last_batch_trainable(model, batches))  # before anything counts the batches
    optimizer, scheduler, average, scaler = optimisation(model, cfg, lr, epochs, steps, ema, batches.device)
    resume = _restore(ctx, phase, model, optimizer, scheduler, average, scaler)
    beat = Heartbeat(ctx.log, phase, epochs, len(batches), ctx.dist.is_main and not sys.stdout.isatty())
    hook = both_hooks(step_hook(model, scheduler, average), beat)
    settings = step_settings(cfg, batches.device, phase != "pretrain", cfg.seed, scaler, hook)
    if settings.micro_batch and settings.micro_batch < batches.batch_size and batch_norms(model):
        ctx.log(
            f"{phase}: every batch of {batches.batch_size} is computed in micro-batches of {settings.micro_batch} "
            "(--micro-batch), and each is normalised with its own batch-norm statistics (ghost batch norm)"
        )

    def end_of_epoch(end: EpochEnd) -> None:
        saved = "state.pt keeps the last good epoch" if (ctx.run.checkpoints / "state.pt").exists() else ""
        check_finite(end.loss, phase, f"in epoch {end.epoch}", saved or "no state was saved yet")
        rec = _epoch_record(phase, end.epoch, epochs, end.loss, end.terms, end.seconds, batches.num_images, end.lr)
        with average.applied(model) if average is not None else nullcontext():
            rec.update(validate())
        ctx.record(rec)
        stop = ctx.dist.any(ctx.stop(), batches.device)
        if end.epoch == epochs or (cfg.checkpoint_every and end.epoch % cfg.checkpoint_every == 0) or stop:
            ctx.save_state(phase, model, optimizer, scheduler, end.epoch, 0, 0.0, 0.0, kernels, average, scaler)
        if stop:
            raise Interrupted(ctx.stop.signum, f"the end of {phase} epoch {end.epoch}", str(ctx.run.path))

    try:
        # under DDP the ranks agree to stop at epoch ends only: no collective per step
        should_stop = None if ctx.dist.enabled else ctx.stop
        train_epochs(
            net,
            batches,
            optimizer,
            scheduler,
            criterion,
            settings,
            epochs,
            end_of_epoch,
            beat,
            resume=resume,
            labelled=labelled,
            should_stop=should_stop,
        )
    except EpochInterrupted as e:
        if math.isfinite(e.loss_sum):  # never save weights that went bad
            terms = {k: float(v) for k, v in e.terms.items()}
            ctx.save_state(
                phase,
                model,
                optimizer,
                scheduler,
                e.epoch - 1,
                e.step,
                e.loss_sum,
                e.seconds,
                kernels,
                average,
                scaler,
                terms,
            )
        where = f"step {e.step}/{len(batches)} of {phase} epoch {e.epoch}"
        raise Interrupted(ctx.stop.signum, where, str(ctx.run.path)) from None
    if average is not None:
        model.load_state_dict(average.shadow)  # the phase's result is the average
    return ctx.history(phase)


def _resumed_terms(saved: object, step: int) -> dict[str, torch.Tensor]:
    """The named loss terms' sums of the epoch a saved state stopped in (read as untrusted: anything but
    a mapping of names to numbers is left out); empty for an epoch that starts fresh."""
    if not step or not isinstance(saved, dict):
        return {}
    return {
        str(k): torch.tensor(v, dtype=torch.float64)
        for k, v in saved.items()
        if isinstance(v, float) and not isinstance(v, bool)
    }


def _epoch_record(
    phase: str,
    epoch: int,
    epochs: int,
    train_loss: float,
    terms: dict,
    seconds: float,
    images: int,
    lr: float,
) -> EpochRecord:
    rec: EpochRecord = {
        "phase": phase,
        "epoch": epoch,
        "epochs": epochs,
        "train_loss": train_loss,
        **{f"train_{k}": v for k, v in sorted(terms.items())},  # type: ignore[typeddict-item]
        "seconds": seconds,
        "images_per_s": images / seconds,
        "lr": lr,
    }
    return rec


def both_hooks(first: Callable[[], None] | None, second: Callable[[], None]) -> Callable[[], None]:
    """One after-step hook calling ``first`` (when there is one), then ``second``."""
    if first is None:
        return second

    def hook() -> None:
        first()
        second()

    return hook
