"""``convae sweep``: does pretraining help when labels are scarce? Measured over label budgets and seeds.

For each budget (labelled images per class) and seed, the same labelled subset trains:
the pretrained encoder fine-tuned, the pretrained encoder frozen (a linear probe trained with
the same recipe), and the same classifier from random init. On the same subset the frozen
pretrained features are also scored by kNN and by logistic regression fitted to convergence on
standardised features (the recipe's probe sees raw feature scales and a fixed step budget).
One autoencoder pretraining serves the whole sweep.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import visualise
from .augment import augment, step_generator
from .checkpoint import load_checkpoint
from .config import Config
from .data import DeviceBatches, ImageSet, per_class_subset, prepare_data
from .device import micro_batch_size, provenance, resolve_device, resolve_precision
from .errors import ConvaeError
from .evaluate import evaluate_classifier
from .fit import RunContext
from .loop import classification_criterion, freeze, make_optimizer, train_mode, train_step
from .models import AutoEncoder, Classifier
from .phases import pretrain_phase
from .probes import extract_features, knn_accuracy, linear_probe_accuracy, random_encoder
from .records import Log, SweepCell
from .report import write_report
from .rundir import RunDir

METHODS = {
    "finetune": "pretrained, fine-tuned",
    "linear_probe": "pretrained, frozen (linear probe)",
    "scratch": "random init (scratch)",
    "knn": "pretrained, frozen (kNN, k=200)",
    "logistic_probe": "pretrained, frozen (logistic regression)",
    "knn_random": "random weights, frozen (kNN, k=200)",
    "logistic_random": "random weights, frozen (logistic regression)",
}
DEFAULT_BUDGETS = ["25", "100", "400", "all"]


def parse_budgets(values: list[str]) -> list[int | None]:
    """``["25", "all"]`` -> ``[25, None]`` (None = every labelled training image)."""
    out: list[int | None] = []
    for v in values:
        if str(v).lower() == "all":
            out.append(None)
            continue
        try:
            n = int(v)
        except ValueError:
            n = 0
        if n <= 0:
            raise ConvaeError(f"label budgets are integers > 0 or 'all'; got {v!r}",
                              advice="--labels-per-class takes integers > 0 or 'all'")
        out.append(n)
    return out


def train_cell(clf: Classifier, train: ImageSet, val: DeviceBatches, cfg: Config, steps: int, seed: int,
               num_classes: int) -> float:
    """``steps`` optimizer steps of the fine-tuning recipe (with its augmentation) on the labelled
    ``train``, then the evaluation-set accuracy."""
    device = next(clf.parameters()).device
    optimizer = make_optimizer(clf.parameters(), cfg.optimizer, cfg.finetune_lr or cfg.lr, cfg.weight_decay)
    batches = DeviceBatches.of(train, device, cfg.batch_size, shuffle=True, seed=seed, placement=cfg.placement)
    micro = micro_batch_size(cfg.micro_batch, cfg.precision, device)
    aug = cfg.augment_config()
    done, epoch = 0, 0
    train_mode(clf)
    while done < steps:
        epoch += 1
        batches.set_epoch(epoch)
        for x, y in batches:
            if aug is not None:
                x = augment(x, aug, step_generator(device, seed, epoch, done))
            train_step(clf, x, y, optimizer, classification_criterion, cfg.precision, micro)
            done += 1
            if done == steps:
                break
    return evaluate_classifier(clf, val, num_classes, cfg.precision)["accuracy"]


def summarise(cells: list[SweepCell]) -> list[dict]:
    """Mean and sample standard deviation of the accuracy per method and budget."""
    groups: dict[tuple, list[float]] = {}
    for c in cells:
        groups.setdefault((c["method"], c["labels_per_class"]), []).append(c["accuracy"])
    rows = []
    for (method, budget), accs in groups.items():
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        rows.append({"method": method, "labels_per_class": budget, "mean": mean, "std": std, "n": len(accs)})
    return rows


def run_sweep(cfg: Config, budgets: list[int | None], seeds: int, steps: int, checkpoint: str | None = None,
              log: Log = print, methods: list[str] | None = None) -> RunDir:
    """Run the sweep into ``cfg.out``: sweep.json, sweep.csv, figures/label_efficiency.png.
    ``methods`` (keys of METHODS; default all) chooses what each budget and seed measures."""
    if seeds <= 0 or steps <= 0:
        raise ConvaeError(f"seeds and steps must be integers > 0; got {seeds} and {steps}")
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown or methods == []:
        raise ConvaeError(f"unknown sweep method(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(METHODS)}")
    chosen = {m: name for m, name in METHODS.items() if methods is None or m in methods}
    device = resolve_device(cfg.device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device, warn=log))
    ae = None
    if checkpoint is not None:
        ae, _ = load_checkpoint(checkpoint, kind="autoencoder")
        cfg = replace(cfg.with_model(ae.config), init_checkpoint=str(checkpoint))
    RunDir.check_free(cfg.out)
    data = prepare_data(cfg, need_labels=True, log=log)
    k = len(data.classes)
    if k < 2:
        raise ConvaeError(f"{cfg.data} has {k} class folder(s): a classifier needs at least 2")
    run = RunDir(cfg.out)
    cfg = replace(cfg, out=str(run.path))
    run.save_config(cfg)
    log(f"sweep folder: {run.path}  (device {device}, precision {cfg.precision})")
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config(num_classes=k)
    started = time.perf_counter()
    if ae is None:
        ae = AutoEncoder(mcfg).to(device, memory_format=torch.channels_last)
        pretrain_phase(ae, data, RunContext(run, cfg, log), device)
    ae = ae.to(device, memory_format=torch.channels_last)
    random_enc = random_encoder(mcfg, cfg.seed, device)
    pretrain_s = time.perf_counter() - started

    labels = data.train.labels.to(device)
    val = DeviceBatches.of(data.val, device, cfg.batch_size, placement=cfg.placement)
    feats = {}
    probed = any(m.startswith(("knn", "logistic")) for m in chosen)  # only trained methods: no features
    for name, enc in (("pretrained", ae.encoder), ("random", random_enc)) if probed else ():
        feats[name] = [extract_features(enc, x, precision=cfg.precision, features=cfg.probe_features)
                       for x in (data.train, data.val)]
    cells: list[SweepCell] = []
    for budget in budgets:
        for i in range(seeds):
            seed = cfg.seed + i
            idx = (torch.arange(len(labels)) if budget is None else
                   per_class_subset(data.train.labels, torch.arange(len(labels)), budget, seed)).to(device)
            for method in chosen:
                start = time.perf_counter()
                train_f, val_f = feats.get("random" if method.endswith("_random") else "pretrained", (None, None))
                if method.startswith("knn"):
                    acc = knn_accuracy(train_f[idx], labels[idx], val_f, val.labels, k)
                elif method.startswith("logistic"):  # standardised features, fitted to convergence
                    acc = linear_probe_accuracy(train_f[idx], labels[idx], val_f, val.labels, k, seed=seed)
                else:
                    torch.manual_seed(seed)
                    clf = Classifier(mcfg) if method == "scratch" else Classifier.from_autoencoder(ae, k)
                    clf = clf.to(device, memory_format=torch.channels_last)
                    if method == "linear_probe":
                        freeze(clf.encoder)
                    acc = train_cell(clf, data.train.subset(idx.cpu()), val, cfg, steps, seed, k)
                cell: SweepCell = {"method": method, "labels_per_class": "all" if budget is None else budget,
                                   "seed": seed, "labelled_images": int(len(idx)), "accuracy": acc,
                                   "seconds": time.perf_counter() - start}
                cells.append(cell)
                run.log_metrics({"phase": "sweep", **cell})
                log(f"sweep  {cell['labels_per_class']!s:>5}/class  seed {seed}  {method:<15}  "
                    f"acc {100 * acc:6.2f}%  {cell['seconds']:.1f}s")
    summary = summarise(cells)
    total_s = time.perf_counter() - started
    result = {
        "eval_set": data.eval_name, "classes": data.classes, "budgets": ["all" if b is None else b for b in budgets],
        "seeds": [cfg.seed + i for i in range(seeds)], "steps": steps, "batch_size": cfg.batch_size,
        "lr": cfg.finetune_lr or cfg.lr, "optimizer": cfg.optimizer, "methods": chosen,
        "probe_features": cfg.probe_features, "augment": cfg.augment,
        "autoencoder": cfg.init_checkpoint or str(run.checkpoints / "autoencoder.pt"),
        "cells": cells, "summary": summary,
        "timing": {"pretrain_s": pretrain_s, "total_s": total_s},
        "images_per_class_all": int(torch.bincount(data.train.labels).max()),
        "provenance": provenance(device, cfg.precision),
    }
    run.write_json("sweep.json", result)
    write_csv(run.path / "sweep.csv", summary)
    visualise.save_label_efficiency(result, run.figures / "label_efficiency.png")
    write_report(run.path)
    log(format_summary(result))
    log(f"sweep: {len(cells)} cells in {total_s:.1f} s")
    return run


def write_csv(path: Path, summary: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "labels_per_class", "mean", "std", "n"])
        w.writeheader()
        for row in summary:
            w.writerow(row)


def format_summary(result: dict) -> str:
    """Accuracy mean +- std (%), one row per method, one column per budget."""
    budgets = result["budgets"]
    cell = {(r["method"], r["labels_per_class"]): r for r in result["summary"]}
    head = f"{'method':<44}" + "".join(f"{str(b) + '/class':>16}" for b in budgets)
    lines = [head]
    for method, name in result["methods"].items():
        vals = []
        for b in budgets:
            r = cell.get((method, b))
            vals.append(f"{100 * r['mean']:6.2f} +- {100 * r['std']:4.2f}" if r else "")
        lines.append(f"{name:<44}" + "".join(f"{v:>16}" for v in vals))
    return "\n".join(lines)
