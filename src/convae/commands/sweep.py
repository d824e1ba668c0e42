"""``convae sweep``: does pretraining help when labels are scarce? Measured over label budgets and seeds.

For each budget (labelled images per class) and seed, the same labelled subset trains:
the pretrained encoder fine-tuned, the pretrained encoder frozen (a linear probe trained with
the same recipe), and the same classifier from random init. On the same subset the frozen
pretrained features are also scored by kNN and by logistic regression fitted to convergence on
standardised features (the recipe's probe sees raw feature scales and a fixed step budget).
The methods of a training mode that reads the unlabelled images (joint training, :mod:`convae.training.joint`;
consistency training, :mod:`convae.training.consistency`) train with every training image unlabelled beside
the labelled subset: from random init (``joint_<mode>``), or from the pretrained encoder and decoder
(``finetune_<mode>``; ``joint_finetune`` for plain joint training, the pretraining objective kept on).
One autoencoder pretraining serves the whole sweep (none when no chosen method reads it). A stopped sweep
continues with ``--resume``: the cells it finished are kept, the others measured as they would have been.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SWEEP_BATCH_SIZE, Config, build_config, load_run_config, presets, read_config_file
from ..config.config import CLASSIFIER_KNOBS
from ..config.modes import training_mode
from ..data import DeviceBatches, per_class_subset
from ..evaluation.probes import extract_features, knn_accuracy, linear_probe_accuracy, random_encoder
from ..models import AutoEncoder, Classifier
from ..models.model_config import model_knobs
from ..outputs import figures
from ..outputs.checkpoint import load_checkpoint
from ..outputs.report import write_report
from ..outputs.rundir import RunDir, locked
from ..outputs.sweep_tables import format_summary, summarise, write_csv
from ..training.fit import RunContext, StopFlag
from ..training.loop import EpochInterrupted
from ..training.phases import CellResult, prepare_classifier, pretrain_phase, train_cell
from ..training.rundata import RunData, check_model_for, prepare_data
from ..utils.device import provenance, resolve_device
from ..utils.errors import ConvaeError, Interrupted, first_line
from ..utils.files import read_file
from ..utils.records import Log, SweepCell
from .sweep_methods import FIXED_STEPS, Method, chosen_methods, parse_budgets

# ----------------------------------------------------------------------------- the sweep


@dataclass
class _Sweep:
    """What every cell of a sweep reads: the data, the pretrained and random encoders, their features."""

    cfg: Config
    data: RunData
    ae: AutoEncoder
    random_enc: nn.Module
    device: torch.device
    val: DeviceBatches
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]]
    stop: StopFlag
    curves: bool = False  # a trained cell evaluated after every epoch too


def _prepare(
    cfg: Config,
    checkpoint: str | None,
    log: Log,
    chosen: dict[str, Method],
    hold: ExitStack,
    curves: bool = False,
    plan: dict | None = None,
) -> tuple[_Sweep, RunDir, float]:
    """The autoencoder (loaded, or pretrained once into the sweep folder), the data and the features. With
    ``plan`` a new sweep folder is made and the plan saved in it; without, ``cfg.out`` is the stopped sweep
    resumed (its own pretrained autoencoder loaded when it had finished pretraining)."""
    device = resolve_device(cfg.device)
    cfg = cfg.for_device(device, log)
    resuming = plan is None
    if resuming:
        run = RunDir.open(cfg.out)
        hold.enter_context(locked(run.path, "resuming a sweep"))
        own = run.checkpoints / "autoencoder.pt"
        if checkpoint is None and own.is_file():
            checkpoint = str(own)
    ae = None
    if checkpoint is not None:
        ae, _ = load_checkpoint(checkpoint, kind="autoencoder")
        try:
            cfg = replace(cfg.with_model(ae.config), init_checkpoint=cfg.init_checkpoint or str(checkpoint))
        except ConvaeError as e:  # a model flag cannot help: the checkpoint decides the network
            raise ConvaeError(
                f"with the checkpoint's network: {e}", advice="change the other flags (not the model's)"
            ) from None
    if not resuming:
        RunDir.check_free(cfg.out)
    data = prepare_data(cfg, need_labels=True, log=log)
    check_model_for(cfg, data, classifier=True)
    if not resuming:
        run, cfg = RunDir.start(cfg, hold, "a sweep")
        run.write_json(PLAN, plan)
    log(f"sweep folder: {run.path}  (device {device}, precision {cfg.precision})")
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config(num_classes=len(data.classes))
    started = time.perf_counter()
    if ae is None:
        ae = AutoEncoder(mcfg).to(device, memory_format=torch.channels_last)
        if any(m.weights == "pretrained" for m in chosen.values()):
            pretrain_phase(ae, data, RunContext(run, cfg, log), device)
        else:
            log(f"sweep: no method reads the pretrained encoder ({', '.join(chosen)}): no pretraining")
    ae = ae.to(device, memory_format=torch.channels_last)
    random_enc = random_encoder(mcfg, cfg.seed, device)
    pretrain_s = time.perf_counter() - started
    feats = {}
    for weights, enc in (("pretrained", ae.encoder), ("random", random_enc)):
        if any(m.probe != "recipe" and m.weights == weights for m in chosen.values()):  # recipes need none
            start = time.perf_counter()
            log(
                f"sweep: features of {len(data.train)} training and {len(data.val)} evaluation images "
                f"({weights} weights, computed once for every cell)"
            )
            feats[weights] = tuple(
                extract_features(
                    enc, x, precision=cfg.precision, features=cfg.probe_features, desc=f"{weights} features: {name}"
                )
                for x, name in ((data.train, "training"), (data.val, "evaluation"))
            )
            log(f"sweep: {weights} features in {time.perf_counter() - start:.1f} s")
    val = DeviceBatches.of(data.val, device, cfg.batch_size, placement=cfg.placement)
    return _Sweep(cfg, data, ae, random_enc, device, val, feats, StopFlag(), curves), run, pretrain_s


def _measure(
    sw: _Sweep, method: Method, idx: torch.Tensor, seed: int, steps: int | None, log: Log, name: str
) -> CellResult:
    """One cell, ``name`` in the log: ``method`` on the labelled images ``idx`` of the training split;
    its accuracy and, for a recipe, the training loss of each epoch, the curve and the loss terms (a probe has none)."""
    k, labels = len(sw.data.classes), sw.data.train.labels.to(sw.device)
    if method.probe != "recipe":
        train_f, val_f = sw.feats[method.weights]
        if method.probe == "knn":
            return CellResult(knn_accuracy(train_f[idx], labels[idx], val_f, sw.val.labels, k))
        # standardised features, fitted to convergence
        return CellResult(linear_probe_accuracy(train_f[idx], labels[idx], val_f, sw.val.labels, k, seed=seed))
    torch.manual_seed(seed)
    clf = (
        Classifier.from_autoencoder(sw.ae, k)
        if method.weights == "pretrained"
        else Classifier(sw.cfg.model_config(num_classes=k))
    )
    clf = clf.to(sw.device, memory_format=torch.channels_last)
    cfg = replace(
        sw.cfg,
        init="pretrained" if method.weights == "pretrained" else "scratch",
        freeze_encoder=method.frozen,
        joint=method.joint,
    )
    prepare_classifier(clf, sw.data.train.subset(idx.cpu()), sw.data.train, cfg, _quiet)
    try:
        # joint training from the pretrained autoencoder starts from its decoder too
        decoder = sw.ae.decoder if training_mode(method.joint).unlabelled and method.weights == "pretrained" else None
        return train_cell(
            clf,
            sw.data.train.subset(idx.cpu()),
            sw.val,
            cfg,
            steps,
            seed,
            k,
            sw.stop,
            sw.data.train,
            log,
            name,
            decoder,
            sw.curves,
        )
    except EpochInterrupted:  # the finished cells are in metrics.jsonl: --resume measures the others
        raise Interrupted(sw.stop.signum, "a sweep cell (the finished ones are kept)", str(sw.cfg.out)) from None


def _quiet(line: str) -> None:  # the recipe's notes, said once per run, would repeat in every cell
    pass


PLAN = "sweep_plan.json"  # what a sweep measures beside its config: --resume reads it back


def run_sweep(
    cfg: Config,
    budgets: list[int | None],
    seeds: int,
    steps: int | None = None,
    checkpoint: str | None = None,
    log: Log = print,
    methods: list[str] | None = None,
    curves: bool = False,
    resume: bool = False,
) -> RunDir:
    """Run the sweep into ``cfg.out``: sweep.json, sweep.csv, figures/label_efficiency.png (and cell_curves.png).
    ``methods`` (keys of :func:`methods`; default all) chooses what each budget and seed measures; ``curves``
    evaluates every trained cell along its training too (``curve``: [steps, accuracy, seconds]). With
    ``resume`` ``cfg.out`` is a stopped sweep of this plan (:func:`resume_sweep`): the cells it finished are kept
    as they were recorded, the others measured with the same seeds and labelled subsets."""
    if seeds <= 0 or (steps is not None and steps <= 0):
        raise ConvaeError(f"seeds and steps must be integers > 0; got {seeds} and {steps}")
    steps = FIXED_STEPS if steps is None and not cfg.epoch_images else steps
    chosen = chosen_methods(methods)
    invalid = {}
    for key, method in chosen.items():  # every cell's config is valid before the first cell trains
        try:
            replace(cfg, joint=method.joint, freeze_encoder=method.frozen)
        except ConvaeError as e:
            if methods is not None:  # asked for by name: refused
                raise
            invalid[key] = e
    if invalid:  # the default, every method: those this config cannot train are left out, and said
        chosen = {k: m for k, m in chosen.items() if k not in invalid}
        first = next(iter(invalid.values()))
        log(f"sweep: {', '.join(invalid)} left out with this config ({first})")
    plan = {
        "labels_per_class": ["all" if b is None else b for b in budgets],
        "seeds": seeds,
        "steps": steps,
        "checkpoint": checkpoint,
        "methods": list(chosen),
        "curves": curves,
    }
    started = time.perf_counter()
    with ExitStack() as hold:  # the sweep folder's lock, held to the end
        sw, run, pretrain_s = _prepare(cfg, checkpoint, log, chosen, hold, curves, None if resume else plan)
        done = _finished_cells(run) if resume else {}
        if resume:
            log(f"sweep: resuming {run.path} with {len(done)} cell(s) finished before")
        cells = _cells(sw, run, budgets, seeds, steps, chosen, log, done)
        timing = {
            "pretrain_s": pretrain_s,
            "total_s": time.perf_counter() - started,
            "cells_s": sum(c["seconds"] for c in cells),
        }
        if resume:
            timing["resumed_cells"] = len(done)
        _write(run, sw, budgets, seeds, steps, chosen, cells, timing, log)
    return run


def _key(budget, seed: int, method: str) -> tuple[str, int, str]:
    return (str(budget), int(seed), str(method))


def _finished_cells(run: RunDir) -> dict[tuple[str, int, str], SweepCell]:
    """The cells a stopped sweep recorded in its metrics.jsonl, by (budget, seed, method)."""
    path = run.file("metrics.jsonl")
    done: dict[tuple[str, int, str], SweepCell] = {}
    if not path.is_file():
        return done
    for line in read_file(path).decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the stop: that cell is measured again
        if isinstance(record, dict) and record.get("phase") == "sweep":
            cell = {k: v for k, v in record.items() if k != "phase"}
            done[_key(cell["labels_per_class"], cell["seed"], cell["method"])] = cell  # type: ignore[assignment]
    return done


def resume_sweep(out: str, log: Log = print, device: str | None = None) -> RunDir:
    """Continue the sweep stopped in ``out`` with its saved config and plan."""
    cfg = load_run_config(out)
    if device is not None:
        cfg = replace(cfg, device=device)
    try:
        plan = json.loads(read_file(Path(out) / PLAN))
        budgets = parse_budgets([str(b) for b in plan["labels_per_class"]])
        args = (int(plan["seeds"]), plan["steps"], plan["checkpoint"], log, list(plan["methods"]), plan["curves"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvaeError(
            f"{out} is not a sweep to continue ({PLAN} missing or unreadable: {first_line(e)})",
            advice="--resume needs --out DIR of a stopped convae sweep",
        ) from None
    if (Path(out) / "sweep.json").is_file():
        raise ConvaeError(f"the sweep in {out} has already finished; nothing to resume")
    return run_sweep(cfg, budgets, *args, resume=True)


def _cells(
    sw: _Sweep,
    run: RunDir,
    budgets: list[int | None],
    seeds: int,
    steps: int | None,
    chosen: dict[str, Method],
    log: Log,
    done: dict[tuple[str, int, str], SweepCell] | None = None,
) -> list[SweepCell]:
    """Every cell of the plan, in order; those in ``done`` (a stopped sweep's) kept as recorded."""
    cells: list[SweepCell] = []
    once = [k for k, m in chosen.items() if m.probe != "recipe"]
    if None in budgets and seeds > 1 and once:
        log(
            f"sweep: with every label ({', '.join(once)}) the frozen features and the labelled set are the same "
            "for every seed: measured once"
        )
    fewest = int(torch.bincount(sw.data.train.labels, minlength=len(sw.data.classes)).min())
    with sw.stop.installed():
        for budget in budgets:
            if budget is not None and fewest < budget:
                log(
                    f"warning: {budget} labels per class: a class has only {fewest} training image(s), and all of "
                    f"them are used (the table marks the budget with *)"
                )
            for i in range(seeds):
                seed = sw.cfg.seed + i
                everything = torch.arange(len(sw.data.train))
                idx = (
                    everything if budget is None else per_class_subset(sw.data.train.labels, everything, budget, seed)
                ).to(sw.device)
                for key, method in chosen.items():
                    if budget is None and i > 0 and key in once:
                        continue  # the same data and features: a second seed would repeat the first
                    kept = (done or {}).get(_key("all" if budget is None else budget, seed, key))
                    if kept is not None:
                        cells.append(kept)
                        continue
                    start = time.perf_counter()
                    name = f"cell {'all' if budget is None else budget}/class seed {seed} {key}"
                    acc, losses, curve, terms = _measure(sw, method, idx, seed, steps, log, name)
                    cell: SweepCell = {
                        "method": key,
                        "labels_per_class": "all" if budget is None else budget,
                        "seed": seed,
                        "labelled_images": int(len(idx)),
                        "accuracy": acc,
                        "seconds": time.perf_counter() - start,
                    }
                    if losses is not None:
                        cell["epoch_losses"] = losses
                    if curve is not None:
                        cell["curve"] = curve
                    if terms is not None:
                        cell["epoch_terms"] = terms
                    cells.append(cell)
                    run.log_metrics({"phase": "sweep", **cell})
                    log(
                        f"sweep  {cell['labels_per_class']!s:>5}/class  seed {seed}  {key:<15}  "
                        f"acc {100 * acc:6.2f}%  {cell['seconds']:.1f}s"
                    )
    return cells


def _write(
    run: RunDir,
    sw: _Sweep,
    budgets: list[int | None],
    seeds: int,
    steps: int | None,
    chosen: dict[str, Method],
    cells: list[SweepCell],
    timing: dict[str, float],
    log: Log,
) -> None:
    cfg, data = sw.cfg, sw.data
    summary = summarise(cells)
    result = {
        "eval_set": data.eval_name,
        "eval_label": data.eval_label,
        "classes": data.classes,
        "budgets": ["all" if b is None else b for b in budgets],
        "seeds": [cfg.seed + i for i in range(seeds)],
        "steps": steps,
        "finetune_epochs": cfg.finetune_epochs,
        "epoch_images": cfg.epoch_images,
        "batch_size": cfg.batch_size,
        "lr": cfg.finetune_lr or cfg.lr,
        "optimizer": cfg.optimizer,
        "methods": {k: m.label for k, m in chosen.items()},
        "probe_features": cfg.probe_features,
        "augment": cfg.augment,
        "crop_padding": cfg.crop_padding,
        "jitter": cfg.jitter,
        "autoencoder": (
            cfg.init_checkpoint or str(run.checkpoints / "autoencoder.pt")
            if any(m.weights == "pretrained" for m in chosen.values())
            else None
        ),
        "cells": cells,
        "summary": summary,
        "timing": timing,
        "images_per_class_all": int(torch.bincount(data.train.labels).max()),
        "capped": _capped_budgets(budgets, cells, data),
        "provenance": provenance(sw.device, cfg.precision),
    }
    run.write_json("sweep.json", result)
    write_csv(run.path / "sweep.csv", summary)
    figures.save_label_efficiency(result, run.figures / "label_efficiency.png")
    if any("curve" in c for c in cells):
        figures.save_cell_curves(result, run.figures / "cell_curves.png")
        figures.save_cell_curves(result, run.figures / "cell_curves_seconds.png", against="seconds")
    write_report(run.path)
    log(format_summary(result))
    log(f"sweep: {len(cells)} cells in {timing['total_s']:.1f} s")


def _capped_budgets(budgets: list[int | None], cells: list[SweepCell], data: RunData) -> dict[str, dict]:
    """The budgets above a class's training images, each with that fewest count and the labelled images its
    cells trained on (every image of those classes, the budget of the others)."""
    fewest = int(torch.bincount(data.train.labels, minlength=len(data.classes)).min())
    out = {}
    for b in budgets:
        if b is not None and fewest < b:
            used = {c["labelled_images"] for c in cells if c["labels_per_class"] == b}
            out[str(b)] = {"fewest": fewest, "labelled_images": min(used) if used else None}
    return out


def _check_model_flags(flags: dict[str, Any], checkpoint: str) -> None:
    """The network of a sweep from ``checkpoint`` is the checkpoint's: a model flag that says otherwise is
    refused (its scratch cells would train a network the flags did not ask for), as ``finetune`` refuses it."""
    ae, _ = load_checkpoint(checkpoint, kind="autoencoder")
    theirs = model_knobs(ae.config)
    norm = lambda v: tuple(v) if isinstance(v, list) else v
    differ = [k for k, v in flags.items() if k in theirs and k not in CLASSIFIER_KNOBS and norm(v) != theirs[k]]
    if differ:
        said = ", ".join(f"--{k.replace('_', '-')} (the checkpoint's: {theirs[k]!r})" for k in differ)
        raise ConvaeError(
            f"the checkpoint decides the network, and {said} says otherwise",
            advice="drop the model flag(s), or sweep without --checkpoint to pretrain that network",
        )


# ----------------------------------------------------------------------------- the command


def main(
    preset: str,
    config_file: str | None,
    overrides: dict[str, Any],
    budgets: list[str],
    seeds: int,
    steps: int | None,
    checkpoint: str | None,
    log: Log,
    methods: list[str] | None = None,
    curves: bool = False,
    resume: bool = False,
    given: list[str] | None = None,
) -> RunDir:
    """``convae sweep``; its batch size defaults to SWEEP_BATCH_SIZE, below the preset, the config file
    and the flags. With ``resume`` the sweep in ``--out`` continues with its saved config and plan: ``given``
    names the sweep's own flags the command line set, which it refuses (as every config flag but --device)."""
    if resume:
        if "out" not in overrides:
            raise ConvaeError("resuming needs the sweep folder to continue", advice="--resume needs --out DIR")
        extra = sorted(set(overrides) - {"out", "device"}) + list(given or [])
        extra += [name for name, value in (("config", config_file), ("checkpoint", checkpoint)) if value]
        if extra:
            raise ConvaeError(
                "a resumed sweep continues with its saved config.json and sweep_plan.json",
                advice="drop " + ", ".join("--" + k.replace("_", "-") for k in extra),
            )
        return resume_sweep(overrides["out"], log, overrides.get("device"))
    if checkpoint is not None:
        _check_model_flags(overrides, checkpoint)
    overrides = dict(overrides)
    given = {**presets().get(preset, {}), **(read_config_file(config_file) if config_file else {}), **overrides}
    if "batch_size" not in given:
        overrides["batch_size"] = SWEEP_BATCH_SIZE
    cfg = build_config(preset, config_file, overrides)
    return run_sweep(cfg, parse_budgets(budgets), seeds, steps, checkpoint, log=log, methods=methods, curves=curves)
