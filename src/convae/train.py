"""Training: the plain PyTorch loops and the pretrain -> transfer -> fine-tune pipeline.

``train_one_epoch`` and ``fit`` are shared by both phases; ``main`` runs ``convae run``,
``convae pretrain`` and ``convae finetune`` (they differ only in the phases they run).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid

from . import visualise
from .checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint
from .config import Config
from .data import DeviceBatches, ImageSet, load_source, per_class_subset, split_indices
from .errors import ConvaeError
from .device import autocast
from .distributed import Dist, setup_distributed, teardown_distributed
from .evaluate import class_results, evaluate_classifier, evaluate_reconstruction, format_class_table
from .models import AutoEncoder, Classifier, ModelConfig
from .html_report import write_report
from .report import RunDir, TensorBoardLog, epoch_line

Log = Callable[[str], None]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


# ----------------------------------------------------------------------------- building blocks


def make_optimizer(params, cfg: Config, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, epochs: int):
    """Stepped once per epoch; ``None`` for a constant learning rate (the lecture's)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=0.1)
    return None


def micro_batch_size(cfg: Config, device: torch.device) -> int | None:
    """``cfg.micro_batch`` or, when 0 (auto), on the CPU 200 images in float32 and 500 in
    bfloat16, and the whole batch on a GPU.

    These were the fastest chunks for the seed model on a 2-core AVX-512 CPU (BENCHMARKS.md).
    """
    if cfg.micro_batch:
        return cfg.micro_batch
    if device.type != "cpu":
        return None
    return 500 if cfg.precision == "bf16" else 200


def freeze(module: nn.Module) -> None:
    """No gradients for ``module`` (the linear probe trains the head alone)."""
    for p in module.parameters():
        p.requires_grad_(False)


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return F.mse_loss(out.float(), x)


def classification_loss(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(out.float(), y)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, optimizer: torch.optim.Optimizer,
               loss_fn: LossFn, precision: str = "fp32", micro_batch: int | None = None,
               global_n: int | None = None, world_size: int = 1) -> torch.Tensor:
    """One optimizer step on batch ``x`` (and labels ``y``); returns the summed loss, on the device.

    With ``micro_batch`` the gradient is accumulated over chunks of that many images before
    the one step: the same update as the whole batch (up to float rounding), but a chunk's
    activations stay in the CPU's caches. Under DDP ``x`` is this rank's shard of a global
    batch of ``global_n`` images; scaling by ``world_size / global_n`` undoes DDP's averaging,
    so the update is the global batch's mean gradient even for uneven shards.
    """
    optimizer.zero_grad(set_to_none=True)
    n = x.shape[0]
    scale = world_size / (global_n or n)
    chunk = micro_batch if micro_batch and micro_batch < n else n
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    starts = list(range(0, n, chunk))
    for i in starts:
        xc = x[i : i + chunk]
        yc = None if y is None else y[i : i + chunk]
        # DDP all-reduces on the last chunk's backward only
        sync = nullcontext() if i == starts[-1] or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(x.device, precision):
                out = model(xc)
            loss = loss_fn(out, xc, yc)
            (loss * (xc.shape[0] * scale)).backward()
        total += loss.detach().double() * xc.shape[0]
    optimizer.step()
    return total


class EpochInterrupted(Exception):
    """Raised by :func:`train_one_epoch` after the step in flight when a stop was asked for."""

    def __init__(self, step: int, loss_sum: float) -> None:
        super().__init__(f"stopped after step {step}")
        self.step, self.loss_sum = step, loss_sum


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    precision: str = "fp32",
    desc: str = "train",
    micro_batch: int | None = None,
    start_step: int = 0,
    loss_sum: float = 0.0,
    should_stop: Callable[[], bool] | None = None,
) -> float:
    """One pass over ``batches``; returns the mean loss per image over all images.

    ``micro_batch`` is passed to :func:`train_step`. ``start_step`` and ``loss_sum`` continue
    an interrupted epoch; ``should_stop`` is polled after every step.
    """
    from tqdm.auto import tqdm

    model.train()
    device = batches.images.device
    total = torch.full((), loss_sum, device=device, dtype=torch.float64)  # summed on the device: no sync per step
    bar = tqdm(batches.iterate(start_step), desc=desc, unit="batch", leave=False, disable=None,
               total=len(batches), initial=start_step)
    for step, (x, y) in enumerate(bar, start=start_step + 1):
        total += train_step(model, x, y, optimizer, loss_fn, precision, micro_batch,
                            batches.global_size(step - 1), batches.world_size)
        if should_stop is not None and should_stop():
            bar.close()
            raise EpochInterrupted(step, float(total))
    if batches.world_size > 1:  # every rank saw its shard: the epoch's loss is the sum over ranks
        torch.distributed.all_reduce(total)
    return float(total) / batches.num_images


class Interrupted(Exception):
    """The run stopped on SIGINT/SIGTERM after saving its state; ``signum`` says which."""

    def __init__(self, signum: int, where: str, run_path: str) -> None:
        super().__init__(where)
        self.signum, self.where, self.run_path = signum, where, run_path


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
    metrics: list[dict] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    resume: dict | None = None  # the saved state.pt, when continuing a run
    stop: StopFlag = field(default_factory=StopFlag)
    tb: TensorBoardLog | None = None
    dist: Dist = field(default_factory=Dist)

    def record(self, rec: dict) -> None:
        """One epoch's metrics: kept on every rank, written and printed by rank 0."""
        self.metrics.append(rec)
        if self.dist.is_main:
            self.run.log_metrics(rec)
            self.log(epoch_line(rec))
            if self.tb is not None:
                self.tb.scalars(rec)

    def resumed(self, phase: str) -> dict | None:
        return self.resume if self.resume is not None and self.resume["phase"] == phase else None

    def history(self, phase: str) -> list[dict]:
        return [m for m in self.metrics if m["phase"] == phase]

    def save_state(self, phase: str, model: nn.Module, optimizer, scheduler, epoch: int, step: int,
                   loss_sum: float, elapsed: float, kernels: torch.Tensor) -> None:
        """Everything needed to continue after ``epoch`` completed epochs and ``step`` more batches."""
        if not self.dist.is_main:
            return
        state = {
            "format": STATE_FORMAT, "phase": phase, "epoch": epoch, "step": step, "loss_sum": loss_sum,
            "elapsed": elapsed, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": torch.get_rng_state(), "metrics": list(self.metrics), "timing": dict(self.timing),
            "kernels": kernels.detach().cpu(), "config": self.cfg.to_dict(),
        }
        path = self.run.checkpoints / "state.pt"
        try:
            atomic_torch_save(state, path)
        except OSError as e:
            raise ConvaeError(f"could not write the training state {path} ({e.strerror or e}); "
                              "the previous state file is intact") from None


STATE_FORMAT = "convae-state"


def fit(
    model: nn.Module,
    phase: str,
    batches: DeviceBatches,
    validate: Callable[[], dict],
    loss_fn: LossFn,
    epochs: int,
    lr: float,
    ctx: RunContext,
    kernels: torch.Tensor,
) -> list[dict]:
    """Train for ``epochs``, validating, logging and saving the state at the end of each epoch.

    Continues from ``ctx.resume`` when it holds this phase. ``kernels`` (the first-layer
    kernels before this phase) travel in the saved state for the figures drawn at the end.
    """
    cfg = ctx.cfg
    net = ctx.dist.wrap(model)  # trained through DDP when distributed; saved and validated unwrapped
    if cfg.compile:
        net = torch.compile(net)
    optimizer = make_optimizer(model.parameters(), cfg, lr)
    scheduler = make_scheduler(optimizer, cfg, epochs)
    first, step, loss_sum, elapsed = 1, 0, 0.0, 0.0
    r = ctx.resumed(phase)
    if r is not None:
        model.load_state_dict(r["model"])
        optimizer.load_state_dict(r["optimizer"])
        if scheduler is not None and r["scheduler"] is not None:
            scheduler.load_state_dict(r["scheduler"])
        torch.set_rng_state(r["rng"])
        first, step, loss_sum, elapsed = r["epoch"] + 1, r["step"], r["loss_sum"], r["elapsed"]
    micro = micro_batch_size(cfg, batches.images.device)
    every = cfg.checkpoint_every
    for epoch in range(first, epochs + 1):
        batches.set_epoch(epoch)
        current_lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        try:
            # under DDP the ranks agree to stop at epoch ends only: no collective per step
            train_loss = train_one_epoch(net, batches, optimizer, loss_fn, cfg.precision, f"{phase} {epoch}/{epochs}",
                                         micro, step, loss_sum, None if ctx.dist.enabled else ctx.stop)
        except EpochInterrupted as e:
            if math.isfinite(e.loss_sum):  # never save weights that went bad
                ctx.save_state(phase, model, optimizer, scheduler, epoch - 1, e.step, e.loss_sum,
                               elapsed + time.perf_counter() - start, kernels)
            raise Interrupted(ctx.stop.signum, f"step {e.step}/{len(batches)} of {phase} epoch {epoch}",
                              str(ctx.run.path)) from None
        seconds = elapsed + time.perf_counter() - start
        step, loss_sum, elapsed = 0, 0.0, 0.0
        if not math.isfinite(train_loss):
            kept = "state.pt keeps the last good epoch" if (ctx.run.checkpoints / "state.pt").exists() else \
                "no state was saved yet"
            raise ConvaeError(f"the {phase} loss became {train_loss} in epoch {epoch}; stopped ({kept}); "
                              "try a lower --lr or --precision fp32")
        if scheduler is not None:
            scheduler.step()
        rec = {"phase": phase, "epoch": epoch, "epochs": epochs, "train_loss": train_loss, **validate(),
               "seconds": seconds, "images_per_s": batches.num_images / seconds, "lr": current_lr}
        ctx.record(rec)
        stop = ctx.dist.any(ctx.stop(), batches.images.device)
        if epoch == epochs or (every and epoch % every == 0) or stop:
            ctx.save_state(phase, model, optimizer, scheduler, epoch, 0, 0.0, 0.0, kernels)
        if stop:
            raise Interrupted(ctx.stop.signum, f"the end of {phase} epoch {epoch}", str(ctx.run.path))
    return ctx.history(phase)


# ----------------------------------------------------------------------------- data of a run


@dataclass
class RunData:
    """The images a run trains and evaluates on (uint8, on the CPU until moved)."""

    train: ImageSet  # every training image: pretraining uses all of them, without labels
    finetune: ImageSet | None  # the labelled images for fine-tuning (maybe N per class)
    val: ImageSet  # the evaluation set: a validation split, or --test-data
    eval_name: str
    classes: list[str]
    skipped: list[str]  # "file: reason" for every file that could not be decoded


def prepare_data(cfg: Config, need_labels: bool, log: Log) -> RunData:
    fmt = dict(channels=cfg.in_channels, height=cfg.height, width=cfg.width, cache_dir=cfg.cache_dir, log=log)
    full = load_source(cfg.data, train=True, **fmt)
    if need_labels and not full.labelled:
        raise ConvaeError(f"{cfg.data} has no class folders (unlabelled): fine-tuning needs labelled data; "
                          "use it with 'convae pretrain', or pass labelled --data")
    if cfg.test_data:
        test = load_source(cfg.test_data, train=False, **fmt)
        if need_labels and not test.labelled:
            raise ConvaeError(f"--test-data {cfg.test_data} has no class folders: evaluation needs labels")
        if full.labelled and test.labelled and test.classes != full.classes:
            raise ConvaeError(f"--test-data classes {test.classes} differ from --data classes {full.classes}")
        train, val, eval_name = full, test, f"test data ({cfg.test_data})"
        skipped = full.skipped + [f"{cfg.test_data}: {s}" for s in test.skipped]
    else:
        if len(full) < 2:
            raise ConvaeError(f"{cfg.data} holds {len(full)} image(s): too few to carve a validation split")
        tr, va = split_indices(full.labels, len(full), cfg.val_fraction, cfg.seed)
        train, val = full.subset(tr), full.subset(va)
        eval_name = f"validation split ({100 * cfg.val_fraction:g}% of {cfg.data}, seed {cfg.seed})"
        skipped = full.skipped
    finetune = None
    if full.labelled:
        finetune = train
        if cfg.labels_per_class:
            finetune = train.subset(per_class_subset(train.labels, torch.arange(len(train)), cfg.labels_per_class, cfg.seed))
    log(f"data: {len(train)} training and {len(val)} evaluation images"
        + (f", {len(full.classes)} classes, {len(finetune)} labelled for fine-tuning" if finetune is not None else ", unlabelled")
        + f"; evaluating on the {eval_name}")
    return RunData(train, finetune, val, eval_name, full.classes, skipped)


# ----------------------------------------------------------------------------- phases


def pretrain(ae: AutoEncoder, data: RunData, ctx: RunContext, device: torch.device) -> list[dict]:
    """Reconstruction training without labels; writes the kernel, loss and reconstruction figures."""
    cfg, run = ctx.cfg, ctx.run
    r = ctx.resumed("pretrain")
    initial = r["kernels"].to(device) if r is not None else ae.encoder.first_conv.weight.detach().clone()
    train = DeviceBatches(data.train.images.to(device), None, cfg.batch_size, shuffle=True, seed=cfg.seed,
                          rank=ctx.dist.rank, world_size=ctx.dist.world_size)
    val = DeviceBatches(data.val.images.to(device), None, cfg.batch_size)

    def validate() -> dict:
        return {"val_loss": evaluate_reconstruction(ae, val, cfg.precision)}

    history = fit(ae, "pretrain", train, validate, reconstruction_loss, cfg.pretrain_epochs, cfg.lr, ctx, initial)
    if not ctx.dist.is_main:
        return history
    save_checkpoint(run.checkpoints / "autoencoder.pt", ae, "autoencoder", data.classes, cfg.to_dict())

    pretrained = ae.encoder.first_conv.weight.detach()
    fig = run.figures
    visualise.save_kernels(initial, fig / "kernels_initial.png", "first-layer kernels, initial (random)")
    visualise.save_kernels(pretrained, fig / "kernels_pretrained.png", "first-layer kernels after pretraining")
    visualise.save_kernels(initial - pretrained, fig / "kernels_pretrain_delta.png", "change in pretraining (initial - pretrained)")
    if history:
        visualise.plot_curve({"train": [h["train_loss"] for h in history], "validation": [h["val_loss"] for h in history]},
                             fig / "pretrain_loss.png", "MSE per pixel", "autoencoder pretraining")
    # spread over the evaluation set: it is ordered by class, and one class says little
    pick = torch.linspace(0, len(data.val) - 1, min(16, len(data.val))).long()
    x = data.val.images[pick].to(device).float().div(255)
    ae.eval()
    with torch.no_grad(), autocast(device, cfg.precision):
        recon = ae(x)
    visualise.save_reconstructions(x, recon.float(), fig / "reconstructions.png")
    if ctx.tb is not None:
        for tag, w in (("kernels/initial", initial), ("kernels/pretrained", pretrained)):
            ctx.tb.image(tag, visualise.kernel_grid(w))
        ctx.tb.image("reconstructions", make_grid(torch.cat([x, recon.float().clamp(0, 1)]).cpu(), nrow=len(x)))
    return history


def finetune(clf: Classifier, data: RunData, ctx: RunContext, device: torch.device) -> dict:
    """Supervised fine-tuning (or a linear probe with --freeze-encoder); returns results.json's dict."""
    cfg, run = ctx.cfg, ctx.run
    r = ctx.resumed("finetune")
    before = r["kernels"].to(device) if r is not None else clf.encoder.first_conv.weight.detach().clone()
    if cfg.freeze_encoder:
        freeze(clf.encoder)
    k = len(data.classes)
    ft = data.finetune
    train = DeviceBatches(ft.images.to(device), ft.labels.to(device), cfg.batch_size, shuffle=True, seed=cfg.seed,
                          rank=ctx.dist.rank, world_size=ctx.dist.world_size)
    val = DeviceBatches(data.val.images.to(device), data.val.labels.to(device), cfg.batch_size)

    last: dict = {}  # the final epoch's evaluation is the result: no second pass over the evaluation set

    def validate() -> dict:
        last["eval"] = evaluate_classifier(clf, val, k, cfg.precision)
        return {"val_loss": last["eval"]["loss"], "val_accuracy": last["eval"]["accuracy"]}

    lr = cfg.finetune_lr or cfg.lr
    history = fit(clf, "finetune", train, validate, classification_loss, cfg.finetune_epochs, lr, ctx, before)
    # a resumed run whose epochs were all done before has not evaluated in this process
    final = last.get("eval") or evaluate_classifier(clf, val, k, cfg.precision)
    results = class_results(final["confusion_matrix"], data.classes)
    if not ctx.dist.is_main:
        return results
    save_checkpoint(run.checkpoints / "classifier.pt", clf, "classifier", data.classes, cfg.to_dict())

    after = clf.encoder.first_conv.weight.detach()
    fig = run.figures
    origin = "pretrained" if cfg.init == "pretrained" else "initial"
    visualise.save_kernels(after, fig / "kernels_finetuned.png", "first-layer kernels after fine-tuning")
    visualise.save_kernels(before - after, fig / "kernels_finetune_delta.png", f"change in fine-tuning ({origin} - fine-tuned)")
    if history:
        visualise.plot_curve({"train": [h["train_loss"] for h in history], "validation": [h["val_loss"] for h in history]},
                             fig / "finetune_loss.png", "cross-entropy", "classifier fine-tuning")
        visualise.plot_curve({"validation accuracy": [100 * h["val_accuracy"] for h in history]},
                             fig / "finetune_accuracy.png", "accuracy (%)",
                             f"accuracy on the {data.eval_name.split(' (')[0]}")
    if ctx.tb is not None:
        ctx.tb.image("kernels/finetuned", visualise.kernel_grid(after))
    results.update({"eval_set": data.eval_name, "loss": final["loss"], "init": cfg.init,
                    "freeze_encoder": cfg.freeze_encoder, "labelled_images": len(ft)})
    visualise.save_confusion_matrix(results["confusion_matrix"], data.classes, fig / "confusion_matrix.png")
    return results


# ----------------------------------------------------------------------------- commands


def adopt_model(cfg: Config, m: ModelConfig) -> None:
    """The data format and architecture follow a checkpoint's model."""
    cfg.in_channels, cfg.height, cfg.width = m.in_channels, m.height, m.width
    cfg.channels, cfg.latent_dim, cfg.upsample = tuple(m.channels), m.latent_dim, m.upsample


def read_state(run: RunDir) -> dict | None:
    """The saved training state of a run folder, or None when no epoch has been saved yet."""
    path = run.checkpoints / "state.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is reported, not raised as a bug
        raise ConvaeError(f"{path} cannot be read ({str(e).splitlines()[0][:200]}); "
                          "start a new run with another --out") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConvaeError(f"{path} is not a convae training state")
    return state


def main(cfg: Config, phases: tuple[str, ...] = ("pretrain", "finetune"), checkpoint: str | None = None,
         log: Log = print, resume: bool = False) -> RunDir:
    """``convae run`` (both phases), ``convae pretrain`` or ``convae finetune --checkpoint AE.pt``.

    With ``resume`` the run folder ``cfg.out`` is continued from its saved state; ``cfg`` must
    be the one in its ``config.json``. Under ``torchrun`` every rank trains its shard and rank 0
    writes the run folder.
    """
    dist, device = setup_distributed(cfg.device)
    try:
        return _main(cfg, phases, checkpoint, log if dist.is_main else (lambda m: None), resume, dist, device)
    finally:
        teardown_distributed()


def _main(cfg: Config, phases: tuple[str, ...], checkpoint: str | None, log: Log, resume: bool, dist: Dist,
          device: torch.device) -> RunDir:
    do_pretrain = "pretrain" in phases and not ("finetune" in phases and cfg.init == "scratch")
    do_finetune = "finetune" in phases
    state = None
    if resume:
        run = RunDir.open(cfg.out)
        state = read_state(run)
        done = (run.path / "results.json").exists() if do_finetune else (run.checkpoints / "autoencoder.pt").exists()
        if done and (state is None or state["phase"] == phases[-1]):
            raise ConvaeError(f"{run.path} has already finished; nothing to resume")
    if checkpoint is not None:
        cfg.init_checkpoint = str(checkpoint)
    ae = None
    finetune_resumed = state is not None and state["phase"] == "finetune"
    if do_finetune and not do_pretrain and cfg.init == "pretrained" and not finetune_resumed:
        if cfg.init_checkpoint is None:
            raise ConvaeError("fine-tuning a pretrained encoder needs --checkpoint AE.pt (or --init scratch)")
        ae, _ = load_checkpoint(cfg.init_checkpoint, kind="autoencoder")
        adopt_model(cfg, ae.config)
    if not resume:
        RunDir.check_free(cfg.out)
    data = prepare_data(cfg, need_labels=do_finetune, log=log)
    if do_finetune and len(data.classes) < 2:
        raise ConvaeError(f"{cfg.data} has {len(data.classes)} class folder(s): a classifier needs at least 2")
    if not resume:
        if dist.is_main:
            run = RunDir(cfg.out)
            cfg.out = str(run.path)
            run.save_config(cfg)
        cfg.out = dist.broadcast(cfg.out)  # the folder rank 0 made (a timestamp when --out is not given)
        if not dist.is_main:
            run = RunDir.open(cfg.out)
    ctx = RunContext(run, cfg, log, resume=state, dist=dist,
                     tb=TensorBoardLog(run.path, cfg.tensorboard and dist.is_main))
    if dist.is_main:
        if data.skipped:
            run.write_lines("skipped.txt", data.skipped)
        if resume:
            run.write_lines("metrics.jsonl", [json.dumps(m) for m in (state or {}).get("metrics", [])])
    if state is not None:
        ctx.metrics, ctx.timing = list(state["metrics"]), dict(state["timing"])
        log(f"resuming {run.path} after {state['phase']} epoch {state['epoch']}"
            + (f" and {state['step']} batch(es)" if state["step"] else ""))
    ranks = f", {dist.world_size} processes" if dist.enabled else ""
    log(f"run folder: {run.path}  (device {device}{ranks}, precision {cfg.precision})")

    torch.manual_seed(cfg.seed)
    mcfg: ModelConfig = cfg.model_config(num_classes=len(data.classes) or 1)
    with ctx.stop.installed():
        if do_pretrain and not finetune_resumed:
            ae = AutoEncoder(mcfg).to(device, memory_format=torch.channels_last)
            start = time.perf_counter()
            pretrain(ae, data, ctx, device)
            ctx.timing["pretrain_s"] = ctx.timing.get("pretrain_s", 0.0) + time.perf_counter() - start
            log(f"pretraining: {cfg.pretrain_epochs} epoch(s) in {ctx.timing['pretrain_s']:.1f} s")
        if do_finetune:
            if finetune_resumed or cfg.init == "scratch":
                clf = Classifier(mcfg)  # weights come from the state when resuming
            else:
                clf = Classifier.from_autoencoder(ae, len(data.classes))
            clf = clf.to(device, memory_format=torch.channels_last)
            start = time.perf_counter()
            results = finetune(clf, data, ctx, device)
            ctx.timing["finetune_s"] = ctx.timing.get("finetune_s", 0.0) + time.perf_counter() - start
            if dist.is_main:
                if cfg.init == "pretrained" and ae is not None:
                    results["representation"] = measure_representation(ae, data, cfg, run, device, log)
                results["timing"] = ctx.timing
                run.write_json("results.json", results)
                log(f"fine-tuning: {cfg.finetune_epochs} epoch(s) in {ctx.timing['finetune_s']:.1f} s")
                log(f"per-class accuracy on the {data.eval_name}:\n" + format_class_table(results))
    if dist.is_main:
        ctx.tb.close()
        log(f"report: {write_report(run.path)}")
        log(f"done: {run.path}")
    return run


def measure_representation(ae: AutoEncoder, data: RunData, cfg: Config, run: RunDir, device: torch.device,
                           log: Log) -> dict:
    """kNN and linear-probe accuracy of the pretrained (frozen) encoder, and its embedding map."""
    from .probes import extract_features, representation_scores

    start = time.perf_counter()
    enc = ae.encoder.to(device)
    bank, queries = data.finetune, data.val
    rep = representation_scores(enc, bank.images, bank.labels, queries.images, queries.labels, len(data.classes),
                                cfg.precision, cfg.seed)
    rep.update({"encoder": "pretrained autoencoder's, frozen", "bank": f"the {len(bank)} labelled fine-tuning images",
                "eval_set": data.eval_name})
    features = extract_features(enc, queries.images, precision=cfg.precision).cpu().numpy()
    visualise.save_embedding_map(features, queries.labels.numpy(), data.classes, run.figures / "embedding_map.png",
                                 "pretrained encoder, evaluation images", max_points=2000, seed=cfg.seed)
    rep["seconds"] = time.perf_counter() - start
    log(f"frozen pretrained encoder: kNN {100 * rep['knn_accuracy']:.2f}%, "
        f"linear probe {100 * rep['linear_probe_accuracy']:.2f}% on the {data.eval_name}")
    return rep
