"""The two phases of the lecture's pipeline, and the measurement of the frozen representation.

``pretrain_phase`` trains an autoencoder with the configured objective (no labels);
``finetune_phase`` trains a classifier (or its head alone); ``measure_representation``
scores the pretrained encoder's frozen features against the same network with random weights;
``prepare_classifier`` and ``train_cell`` are the fine-tuning recipe as a sweep cell runs it.
Each writes its checkpoint and figures into the run folder (rank 0 only).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import NamedTuple

import torch

from ..config import Config
from ..config.modes import training_mode
from ..data import DeviceBatches, ImageSet, to_model_input
from ..evaluation.metrics import class_results, evaluate_classifier, evaluate_reconstruction
from ..evaluation.probes import bank_size, extract_features, fit_head, frozen_representation
from ..models import AutoEncoder, Classifier
from ..models.objectives import make_objective
from ..models.registry import EncoderBase
from ..outputs import figures
from ..outputs.checkpoint import save_checkpoint
from ..outputs.rundir import Heartbeat
from ..utils.device import autocast
from ..utils.records import EpochRecord, Log, Representation, Results, Validation
from .fit import EpochEnd, RunContext, StopFlag, both_hooks, fit, optimisation, step_settings, train_epochs
from .loop import check_finite, freeze, keep_last_batch_trainable
from .recipe import step_hook
from .rundata import RunData


class CellResult(NamedTuple):
    """What a sweep cell measured: its accuracy, and for a trained cell the mean loss of each epoch, the curve
    (``--curves``) and each epoch's named loss terms (None where it has none)."""

    accuracy: float
    losses: list[float] | None = None
    curve: list[list[float]] | None = None
    terms: list[dict[str, float]] | None = None


MAP_POINTS = 2000  # evaluation images a run's t-SNE map shows (a seeded pick)
CURVE_POINTS = 10  # evaluations a sweep cell's --curves records at most


def _fit_to_data(encoder: EncoderBase, images, seed: int) -> str | None:
    """What an encoder fits before pretraining (the patch network's whitening), on a seeded sample
    of the training images, on the CPU: every rank draws the same sample and fits the same."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=g)[: encoder.fit_images].sort().values
    return encoder.fit_to_data(to_model_input(images.take(pick)), g)


def pretrain_phase(ae: AutoEncoder, data: RunData, ctx: RunContext, device: torch.device) -> list[EpochRecord]:
    """Training without labels; validation reports the objective's loss on the evaluation set."""
    cfg, run = ctx.cfg, ctx.run
    r = ctx.resumed("pretrain")
    if r is None and ae.encoder.fit_images:  # resuming: what was fitted comes with the weights
        note = _fit_to_data(ae.encoder, data.train, cfg.seed)
        if note:
            ctx.log(note)
    initial = r["kernels"].to(device) if r is not None else ae.encoder.kernels()
    train = DeviceBatches.of(
        data.train,
        device,
        cfg.batch_size,
        labels=False,
        shuffle=True,
        seed=cfg.seed,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
        placement=cfg.placement,
    )
    val = DeviceBatches.of(data.val, device, cfg.batch_size, labels=False, placement=cfg.placement)
    ctx.log(f"pretraining batches: {train.describe()}")
    objective = make_objective(cfg.objective_config())

    def validate() -> Validation:
        return {"val_loss": evaluate_reconstruction(ae, val, cfg.precision, objective, cfg.seed)}

    history = fit(ae, "pretrain", train, validate, objective, cfg.pretrain_epochs, cfg.lr, ctx, initial)
    if not ctx.dist.is_main:
        return history
    save_checkpoint(run.checkpoints / "autoencoder.pt", ae, "autoencoder", data.classes, cfg.to_dict())
    ctx.check_stop("the pretraining figures")
    # spread over the evaluation set: it is ordered by class, and one class says little
    pick = torch.linspace(0, len(data.val) - 1, min(16, len(data.val))).long()
    x = to_model_input(data.val.take(pick).to(device))
    ae.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the same masks or noise every run
    with torch.no_grad(), autocast(device, cfg.precision):
        rows = {k: v.float() for k, v in objective.examples(ae, x, gen).items()}
    pretrained = ae.encoder.kernels()
    figures.save_pretrain_figures(run.figures, initial, pretrained, history, x, rows, data.eval_label)
    if ctx.tb is not None:
        for tag, w in (("kernels/initial", initial), ("kernels/pretrained", pretrained)):
            ctx.tb.image(tag, figures.kernel_grid(w))
        ctx.tb.image("reconstructions", figures.reconstruction_grid(x, rows))
    return history


def finetune_phase(
    clf: Classifier, data: RunData, ctx: RunContext, device: torch.device, decoder: torch.nn.Module | None = None
) -> Results:
    """Supervised fine-tuning (or a linear probe with ``freeze_encoder``), or joint training (``cfg.joint``,
    starting from ``decoder``, the pretrained autoencoder's, when there is one); returns results.json's record."""
    cfg, run = ctx.cfg, ctx.run
    r = ctx.resumed("finetune")
    k = len(data.classes)
    ft = data.finetune
    assert ft is not None, "fine-tuning needs labelled data (checked by prepare_data)"
    prepare_classifier(clf, ft, data.train, cfg, ctx.log, fresh=r is None)
    before = r["kernels"].to(device) if r is not None else clf.encoder.kernels()
    model, train, criterion, labelled = _training(
        clf, ft, data.train, data.classes, cfg, device, cfg.seed, ctx.dist.rank, ctx.dist.world_size, decoder
    )
    ctx.log(training_mode(cfg.joint).describe(cfg, len(ft), train))
    val = DeviceBatches.of(data.val, device, cfg.batch_size, placement=cfg.placement)

    last: dict = {}  # the final epoch's evaluation is the result: no second pass over the evaluation set
    best_path = run.checkpoints / "classifier_best.pt"

    def validate() -> Validation:
        last["eval"] = evaluate_classifier(clf, val, k, cfg.precision)
        done = ctx.history("finetune")  # the epochs before this one (restored on resume)
        if ctx.dist.is_main and last["eval"]["accuracy"] > max((m["val_accuracy"] for m in done), default=-1.0):
            save_checkpoint(best_path, clf, "classifier", data.classes, cfg.to_dict())  # the best epoch so far
        return {"val_loss": last["eval"]["loss"], "val_accuracy": last["eval"]["accuracy"]}

    lr = cfg.finetune_lr or cfg.lr
    history = fit(
        model,
        "finetune",
        train,
        validate,
        criterion,
        cfg.finetune_epochs,
        lr,
        ctx,
        before,
        ema=cfg.ema,
        labelled=labelled,
    )
    # a resumed run whose epochs were all done before has not evaluated in this process
    final = last.get("eval") or evaluate_classifier(clf, val, k, cfg.precision)
    results = class_results(final["confusion_matrix"], data.classes)
    if not ctx.dist.is_main:
        return results
    save_checkpoint(run.checkpoints / "classifier.pt", clf, "classifier", data.classes, cfg.to_dict())
    ctx.check_stop("the fine-tuning figures")
    after = clf.encoder.kernels()
    origin = "pretrained" if cfg.init == "pretrained" else "initial"
    figures.save_finetune_figures(
        run.figures, before, after, origin, history, data.eval_label, results["confusion_matrix"], data.classes
    )
    if ctx.tb is not None:
        ctx.tb.image("kernels/finetuned", figures.kernel_grid(after))
    results.update(
        {
            "eval_set": data.eval_name,
            "eval_label": data.eval_label,
            "loss": final["loss"],
            "init": cfg.init,
            "freeze_encoder": cfg.freeze_encoder,
            "labelled_images": len(ft),
        }
    )
    if history:
        top = max(history, key=lambda m: m["val_accuracy"])  # the first epoch of the highest accuracy
        results["best"] = {
            "epoch": top["epoch"],
            "val_accuracy": top["val_accuracy"],
            "checkpoint": str(best_path.relative_to(run.path)),
            "selected_on": data.eval_name,
        }
    return results


def prepare_classifier(clf: Classifier, labelled, unlabelled, cfg, log, fresh: bool = True) -> None:
    """The recipe's steps before the first fine-tuning step, the same for a run and a sweep cell:
    the test-time flip as configured, the statistics a scratch encoder fits (on ``unlabelled``),
    the frozen encoder, and LP-FT's head (fitted on the frozen features of ``labelled``).
    ``fresh`` is False when resuming: what was fitted comes with the saved weights."""
    if clf.config.tta != cfg.tta:  # a classifier-only knob: not the pretrained autoencoder's to decide
        clf.config = replace(clf.config, tta=cfg.tta)
    if fresh and cfg.init == "scratch" and clf.encoder.fit_images:
        note = _fit_to_data(clf.encoder, unlabelled, cfg.seed)
        if note:
            log(note)
    if cfg.freeze_encoder:
        freeze(clf.encoder)
    if fresh and cfg.lp_ft:
        acc = fit_head(clf, labelled, labelled.labels, cfg.precision, cfg.seed)
        log(
            f"LP-FT: head fitted on the frozen features of {len(labelled)} labelled images "
            f"(training accuracy {100 * acc:.2f}%)"
        )


def measure_representation(ae: AutoEncoder, data: RunData, ctx: RunContext, device: torch.device) -> Representation:
    """kNN and linear-probe accuracy of the pretrained (frozen) encoder next to the same
    architecture with random weights (seeded), and the embedding map of the evaluation set."""
    cfg = ctx.cfg
    ctx.check_stop("the representation scores")
    start = time.perf_counter()
    enc = ae.encoder.to(device)
    bank, queries = data.finetune, data.val
    assert bank is not None and bank.labels is not None and queries.labels is not None
    ctx.log(
        f"measuring the frozen representation: features of {bank_size(len(bank))} labelled and {len(queries)} "
        "evaluation images, pretrained and random weights, then kNN and a linear probe on each"
    )
    rep: Representation = frozen_representation(  # type: ignore[assignment]
        enc, bank, queries, len(data.classes), cfg.precision, cfg.seed, cfg.probe_features
    )
    rep.update(
        {
            "encoder": "pretrained autoencoder's, frozen",
            "bank": f"the {len(bank)} labelled fine-tuning images",
            "eval_set": data.eval_name,
        }
    )
    ctx.check_stop("the embedding map")
    # only the images the map shows: the map's own seeded pick, so its figure is the same
    shown = queries.subset(torch.from_numpy(figures.map_points(len(queries), MAP_POINTS, cfg.seed)))
    features = extract_features(
        enc, shown, precision=cfg.precision, features=cfg.probe_features, desc="features for the map"
    )
    ctx.log(f"drawing the t-SNE map of {len(shown)} evaluation images")
    figures.attempt(
        ctx.log,
        "the embedding map",
        lambda: figures.save_embedding_map(
            features.cpu().numpy(),
            shown.labels.numpy(),
            data.classes,
            ctx.run.figures / "embedding_map.png",
            f"pretrained encoder, {data.eval_label}",
            max_points=MAP_POINTS,
            seed=cfg.seed,
            picked=True,
        ),
    )
    rep["seconds"] = time.perf_counter() - start
    rand = rep["random"]
    below = [
        p for p, key in (("kNN", "knn_accuracy"), ("linear probe", "linear_probe_accuracy")) if rep[key] < rand[key]
    ]
    ctx.log(
        f"frozen pretrained encoder ({cfg.probe_features} features): kNN {100 * rep['knn_accuracy']:.2f}%, "
        f"linear probe {100 * rep['linear_probe_accuracy']:.2f}%; random weights: kNN "
        f"{100 * rand['knn_accuracy']:.2f}%, linear probe {100 * rand['linear_probe_accuracy']:.2f}% "
        f"on the {data.eval_name}"
        + (
            f"; the pretrained encoder scores below random weights ({' and '.join(below)}): pretraining did not "
            "help these probes"
            if below
            else ""
        )
        + f" ({rep['seconds']:.0f} s)"
    )
    return rep


def _training(
    clf: Classifier,
    labelled: ImageSet,
    unlabelled: ImageSet | None,
    classes: list[str],
    cfg: Config,
    device: torch.device,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    decoder=None,
):
    """What a fine-tuning phase or a sweep cell trains and reads: the training mode's (``cfg.joint``,
    :mod:`convae.config.modes`) model, batches, criterion and labelled stream (None when it has none)."""
    mode = training_mode(cfg.joint)
    return mode.build(
        clf, labelled, unlabelled if mode.unlabelled else None, classes, cfg, device, seed, rank, world_size, decoder
    )


def train_cell(
    clf: Classifier,
    train: ImageSet,
    val: DeviceBatches,
    cfg: Config,
    steps: int | None,
    seed: int,
    num_classes: int,
    stop: StopFlag | None = None,
    unlabelled: ImageSet | None = None,
    log: Log | None = None,
    name: str = "cell",
    decoder: torch.nn.Module | None = None,
    curve: bool = False,
) -> CellResult:
    """The fine-tuning recipe of a run on the labelled ``train`` (``prepare_classifier`` done):
    ``cfg.finetune_epochs`` epochs of at least ``cfg.epoch_images`` images, or exactly ``steps``
    optimizer steps, with the run's schedule, label smoothing, weight average and augmentation,
    through the training loop of every run (its seeding, the stop flag, the NaN guard); then the
    evaluation-set accuracy (of the average, when there is one) and the mean training loss of each
    epoch, so a cell's record shows whether it converged. With ``cfg.joint`` the epochs are
    passes over ``unlabelled``, ``train`` cycling beside them, as a joint run trains. With ``log``
    and no terminal, a line about every minute says where cell ``name`` is and its time left. ``decoder``: a
    pretrained autoencoder's, where plain joint training starts from it (the cell trains a copy). With
    ``curve`` also [optimizer steps done, evaluation-set accuracy, training seconds] at the end of the epochs
    that pass each tenth of the steps (of the average, as at the end; an epoch of a few labelled images is a
    few steps, and evaluating after each would cost more than the training), else None. Each epoch's named loss
    terms too (a training mode's: its mask rate, say), where it has any."""
    device = next(clf.parameters()).device
    model, batches, criterion, side = _training(
        clf, train, unlabelled, [str(c) for c in range(num_classes)], cfg, device, seed, decoder=decoder
    )
    keep_last_batch_trainable(model, batches)
    total = steps if steps is not None else cfg.finetune_epochs * len(batches)
    epochs = -(-total // len(batches))
    optimizer, scheduler, average, scaler = optimisation(
        model, cfg, cfg.finetune_lr or cfg.lr, epochs, len(batches), cfg.ema, device, total
    )
    beat = Heartbeat(log or print, name, epochs, len(batches), log is not None and not sys.stdout.isatty())
    hook = both_hooks(step_hook(model, scheduler, average), beat)
    settings = step_settings(cfg, device, True, seed, scaler, hook)
    losses, accuracies, terms = [], [], []
    started, evaluating = time.perf_counter(), [0.0]  # the curve's seconds are the training's alone

    def end_of_epoch(end: EpochEnd) -> None:
        check_finite(end.loss, "fine-tuning", f"after {end.done} step(s) of a sweep cell")
        losses.append(float(end.loss))
        terms.append(dict(end.terms))
        due = (len(accuracies) + 1) * total / CURVE_POINTS
        if curve and due <= end.done < total:  # the last epoch's is the cell's accuracy
            seconds = time.perf_counter() - started - evaluating[0]
            with average.applied(model) if average is not None else nullcontext():
                acc = evaluate_classifier(clf, val, num_classes, cfg.precision)["accuracy"]
            accuracies.append([end.done, acc, seconds])
            evaluating[0] = time.perf_counter() - started - seconds

    train_epochs(
        model,
        batches,
        optimizer,
        scheduler,
        criterion,
        settings,
        epochs,
        end_of_epoch,
        beat,
        total=total,
        labelled=side,
        should_stop=stop,
    )
    seconds = time.perf_counter() - started - evaluating[0]
    if average is not None:
        model.load_state_dict(average.shadow)
    accuracy = evaluate_classifier(clf, val, num_classes, cfg.precision)["accuracy"]
    points = accuracies + [[total, accuracy, seconds]] if curve else None  # the budget is always spent
    return CellResult(accuracy, losses, points, terms if any(terms) else None)
