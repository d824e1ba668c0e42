"""Training: the plain PyTorch loops and the pretrain -> transfer -> fine-tune pipeline.

``train_one_epoch`` and ``fit`` are shared by both phases; ``main`` runs ``convae run``,
``convae pretrain`` and ``convae finetune`` (they differ only in the phases they run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import visualise
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .data import DeviceBatches, ImageSet, load_source, per_class_subset, split_indices
from .errors import ConvaeError
from .device import autocast, resolve_device
from .evaluate import class_results, evaluate_classifier, evaluate_reconstruction, format_class_table
from .models import AutoEncoder, Classifier, ModelConfig
from .report import RunDir, epoch_line

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
    """``cfg.micro_batch`` or, when 0 (auto), 200 images on the CPU and the whole batch on a GPU.

    200 was the fastest chunk for the seed model on a 2-core AVX-512 CPU (BENCHMARKS.md).
    """
    if cfg.micro_batch:
        return cfg.micro_batch
    return 200 if device.type == "cpu" else None


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return F.mse_loss(out.float(), x)


def classification_loss(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(out.float(), y)


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    precision: str = "fp32",
    desc: str = "train",
    micro_batch: int | None = None,
) -> float:
    """One pass over ``batches``; returns the mean loss per image over all images.

    With ``micro_batch`` each batch's gradient is accumulated over chunks of that many
    images before the one optimizer step: the same update as the whole batch (up to float
    rounding), but the activations of a chunk stay in the CPU's caches.
    """
    from tqdm.auto import tqdm

    model.train()
    device = batches.images.device
    total = torch.zeros((), device=device, dtype=torch.float64)  # summed on the device: no sync per step
    for x, y in tqdm(batches, desc=desc, unit="batch", leave=False, disable=None):
        optimizer.zero_grad(set_to_none=True)
        n = x.shape[0]
        step = micro_batch if micro_batch and micro_batch < n else n
        for i in range(0, n, step):
            xc = x[i : i + step]
            yc = None if y is None else y[i : i + step]
            with autocast(device, precision):
                out = model(xc)
            loss = loss_fn(out, xc, yc)
            (loss * (xc.shape[0] / n)).backward()
            total += loss.detach().double() * xc.shape[0]
        optimizer.step()
    return float(total) / batches.num_images


def fit(
    model: nn.Module,
    phase: str,
    batches: DeviceBatches,
    validate: Callable[[], dict],
    loss_fn: LossFn,
    epochs: int,
    lr: float,
    cfg: Config,
    run: RunDir,
    log: Log,
) -> list[dict]:
    """Train for ``epochs``, validating and logging one metrics line per epoch."""
    optimizer = make_optimizer(model.parameters(), cfg, lr)
    scheduler = make_scheduler(optimizer, cfg, epochs)
    history = []
    for epoch in range(1, epochs + 1):
        batches.set_epoch(epoch)
        current_lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        train_loss = train_one_epoch(model, batches, optimizer, loss_fn, cfg.precision, f"{phase} {epoch}/{epochs}",
                                     micro_batch_size(cfg, batches.images.device))
        seconds = time.perf_counter() - start
        if scheduler is not None:
            scheduler.step()
        rec = {"phase": phase, "epoch": epoch, "epochs": epochs, "train_loss": train_loss, **validate(),
               "seconds": seconds, "images_per_s": batches.num_images / seconds, "lr": current_lr}
        run.log_metrics(rec)
        log(epoch_line(rec))
        history.append(rec)
    return history


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


def pretrain(ae: AutoEncoder, data: RunData, cfg: Config, run: RunDir, device: torch.device, log: Log) -> list[dict]:
    """Reconstruction training without labels; writes the kernel, loss and reconstruction figures."""
    initial = ae.encoder.first_conv.weight.detach().clone()
    train = DeviceBatches(data.train.images.to(device), None, cfg.batch_size, shuffle=True, seed=cfg.seed)
    val = DeviceBatches(data.val.images.to(device), None, cfg.batch_size)

    def validate() -> dict:
        return {"val_loss": evaluate_reconstruction(ae, val, cfg.precision)}

    history = fit(ae, "pretrain", train, validate, reconstruction_loss, cfg.pretrain_epochs, cfg.lr, cfg, run, log)
    save_checkpoint(run.checkpoints / "autoencoder.pt", ae, "autoencoder", data.classes, cfg.to_dict())

    pretrained = ae.encoder.first_conv.weight.detach()
    fig = run.figures
    visualise.save_kernels(initial, fig / "kernels_initial.png", "first-layer kernels, initial (random)")
    visualise.save_kernels(pretrained, fig / "kernels_pretrained.png", "first-layer kernels after pretraining")
    visualise.save_kernels(initial - pretrained, fig / "kernels_pretrain_delta.png", "change in pretraining (initial - pretrained)")
    if history:
        visualise.plot_curve([h["train_loss"] for h in history], fig / "pretrain_loss.png", "MSE per pixel",
                             "autoencoder pretraining", "train loss")
    # spread over the evaluation set: it is ordered by class, and one class says little
    pick = torch.linspace(0, len(data.val) - 1, min(16, len(data.val))).long()
    x = data.val.images[pick].to(device).float().div(255)
    ae.eval()
    with torch.no_grad(), autocast(device, cfg.precision):
        recon = ae(x)
    visualise.save_reconstructions(x, recon.float(), fig / "reconstructions.png")
    return history


def finetune(clf: Classifier, data: RunData, cfg: Config, run: RunDir, device: torch.device, log: Log) -> dict:
    """Supervised fine-tuning (or a linear probe with --freeze-encoder); returns results.json's dict."""
    before = clf.encoder.first_conv.weight.detach().clone()
    if cfg.freeze_encoder:
        for p in clf.encoder.parameters():
            p.requires_grad_(False)
    k = len(data.classes)
    ft = data.finetune
    train = DeviceBatches(ft.images.to(device), ft.labels.to(device), cfg.batch_size, shuffle=True, seed=cfg.seed)
    val = DeviceBatches(data.val.images.to(device), data.val.labels.to(device), cfg.batch_size)

    def validate() -> dict:
        r = evaluate_classifier(clf, val, k, cfg.precision)
        return {"val_loss": r["loss"], "val_accuracy": r["accuracy"]}

    lr = cfg.finetune_lr or cfg.lr
    history = fit(clf, "finetune", train, validate, classification_loss, cfg.finetune_epochs, lr, cfg, run, log)
    save_checkpoint(run.checkpoints / "classifier.pt", clf, "classifier", data.classes, cfg.to_dict())

    after = clf.encoder.first_conv.weight.detach()
    fig = run.figures
    origin = "pretrained" if cfg.init == "pretrained" else "initial"
    visualise.save_kernels(after, fig / "kernels_finetuned.png", "first-layer kernels after fine-tuning")
    visualise.save_kernels(before - after, fig / "kernels_finetune_delta.png", f"change in fine-tuning ({origin} - fine-tuned)")
    if history:
        visualise.plot_curve([h["train_loss"] for h in history], fig / "finetune_loss.png", "cross-entropy",
                             "classifier fine-tuning", "train loss")
        visualise.plot_curve([100 * h["val_accuracy"] for h in history], fig / "finetune_accuracy.png",
                             "accuracy (%)", f"accuracy on the {data.eval_name.split(' (')[0]}", "val accuracy", "r")
    final = evaluate_classifier(clf, val, k, cfg.precision)
    results = class_results(final["confusion_matrix"], data.classes)
    results.update({"eval_set": data.eval_name, "loss": final["loss"], "init": cfg.init,
                    "freeze_encoder": cfg.freeze_encoder, "labelled_images": len(ft)})
    visualise.save_confusion_matrix(results["confusion_matrix"], data.classes, fig / "confusion_matrix.png")
    return results


# ----------------------------------------------------------------------------- commands


def main(cfg: Config, phases: tuple[str, ...] = ("pretrain", "finetune"), checkpoint: str | None = None,
         log: Log = print) -> RunDir:
    """``convae run`` (both phases), ``convae pretrain`` or ``convae finetune --checkpoint AE.pt``."""
    device = resolve_device(cfg.device)
    do_pretrain = "pretrain" in phases and not ("finetune" in phases and cfg.init == "scratch")
    do_finetune = "finetune" in phases
    ae = None
    if do_finetune and not do_pretrain and cfg.init == "pretrained":
        if checkpoint is None:
            raise ConvaeError("fine-tuning a pretrained encoder needs --checkpoint AE.pt (or --init scratch)")
        ae, _ = load_checkpoint(checkpoint, kind="autoencoder")
        m = ae.config  # the data format follows the checkpoint's model
        cfg.in_channels, cfg.height, cfg.width = m.in_channels, m.height, m.width
        cfg.channels, cfg.latent_dim, cfg.upsample = tuple(m.channels), m.latent_dim, m.upsample
    RunDir.check_free(cfg.out)
    data = prepare_data(cfg, need_labels=do_finetune, log=log)
    run = RunDir(cfg.out)
    cfg.out = str(run.path)
    run.save_config(cfg)
    if data.skipped:
        run.write_lines("skipped.txt", data.skipped)
    log(f"run folder: {run.path}  (device {device}, precision {cfg.precision})")

    torch.manual_seed(cfg.seed)
    mcfg: ModelConfig = cfg.model_config(num_classes=len(data.classes) or 1)
    timing: dict[str, float] = {}
    if do_pretrain:
        ae = AutoEncoder(mcfg).to(device, memory_format=torch.channels_last)
        start = time.perf_counter()
        pretrain(ae, data, cfg, run, device, log)
        timing["pretrain_s"] = time.perf_counter() - start
        log(f"pretraining: {cfg.pretrain_epochs} epoch(s) in {timing['pretrain_s']:.1f} s")
    if do_finetune:
        if cfg.init == "scratch":
            clf = Classifier(mcfg)
        else:
            clf = Classifier.from_autoencoder(ae, len(data.classes))
        clf = clf.to(device, memory_format=torch.channels_last)
        start = time.perf_counter()
        results = finetune(clf, data, cfg, run, device, log)
        timing["finetune_s"] = time.perf_counter() - start
        results["timing"] = timing
        run.write_json("results.json", results)
        log(f"fine-tuning: {cfg.finetune_epochs} epoch(s) in {timing['finetune_s']:.1f} s")
        log(f"per-class accuracy on the {data.eval_name}:\n" + format_class_table(results))
    log(f"done: {run.path}")
    return run
