"""Evaluation: reconstruction error, accuracy, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import DeviceBatches
from .device import autocast


@torch.no_grad()
def evaluate_reconstruction(model: nn.Module, batches: DeviceBatches, precision: str = "fp32") -> float:
    """Mean squared error per pixel over every image of ``batches``."""
    model.eval()
    device = batches.images.device
    total = torch.zeros((), device=device, dtype=torch.float64)
    for x, _ in batches:
        with autocast(device, precision):
            out = model(x)
        total += F.mse_loss(out.float(), x, reduction="sum").double() / x[0].numel()
    return float(total) / batches.num_images


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: DeviceBatches, num_classes: int, precision: str = "fp32") -> dict:
    """Mean cross-entropy, accuracy and confusion matrix (rows: true, columns: predicted)."""
    model.eval()
    device = batches.images.device
    loss = torch.zeros((), device=device, dtype=torch.float64)
    cm = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for x, y in batches:
        with autocast(device, precision):
            logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        cm += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    cm = cm.view(num_classes, num_classes).cpu()
    n = int(cm.sum())
    return {
        "loss": float(loss) / max(n, 1),
        "accuracy": float(cm.diag().sum()) / max(n, 1),
        "confusion_matrix": cm.tolist(),
    }


def class_results(confusion: list[list[int]], classes: list[str]) -> dict:
    """Overall and per-class accuracy from a confusion matrix."""
    cm = torch.tensor(confusion)
    totals = cm.sum(1)
    correct = cm.diag()
    per_class = {
        name: {"accuracy": (float(correct[i]) / float(totals[i])) if totals[i] else None,
               "correct": int(correct[i]), "total": int(totals[i])}
        for i, name in enumerate(classes)
    }
    n = int(totals.sum())
    return {
        "accuracy": float(correct.sum()) / n if n else None,
        "num_images": n,
        "classes": list(classes),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def format_class_table(results: dict) -> str:
    """The lecture's per-class printout, as a table."""
    width = max(8, *(len(c) for c in results["classes"]))
    lines = [f"{'class':<{width}}  {'correct':>7}  {'total':>6}  accuracy"]
    for name, r in results["per_class"].items():
        acc = "   n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:6.2f} %"
        lines.append(f"{name:<{width}}  {r['correct']:>7}  {r['total']:>6}  {acc}")
    lines.append(f"{'overall':<{width}}  {sum(r['correct'] for r in results['per_class'].values()):>7}  "
                 f"{results['num_images']:>6}  {100 * results['accuracy']:6.2f} %")
    return "\n".join(lines)


def main(cfg, checkpoint: str, train_data: str | None = None, log: Callable[[str], None] = print) -> dict:
    """``convae evaluate``: a checkpoint on every image of ``cfg.data`` (``cifar10`` = its test split).

    A classifier checkpoint is scored as a classifier. With ``train_data`` (labelled), the
    checkpoint's frozen encoder (an autoencoder's or a classifier's) is also scored by kNN and a
    linear probe trained on ``train_data``'s features. With ``--out`` everything is written there.
    """
    from . import visualise
    from .checkpoint import load_checkpoint
    from .data import load_source
    from .device import resolve_device
    from .errors import ConvaeError
    from .probes import representation_scores
    from .report import RunDir

    device = resolve_device(cfg.device)
    model, payload = load_checkpoint(checkpoint)
    is_classifier = payload["kind"] == "classifier"
    if not is_classifier and train_data is None:
        raise ConvaeError(f"{checkpoint} holds an autoencoder: evaluating it needs --train-data SRC "
                          "(labelled images for the kNN bank and the linear probe)")
    m = model.config
    if cfg.out:
        RunDir.check_free(cfg.out)
    ds = load_source(cfg.data, m.in_channels, m.height, m.width, cfg.cache_dir, train=False, log=log)
    if not ds.labelled:
        raise ConvaeError(f"{cfg.data} has no class folders: evaluation needs labelled data")
    classes = payload.get("classes") or ds.classes
    if is_classifier and ds.classes != classes:
        raise ConvaeError(f"{cfg.data} has classes {ds.classes}, the checkpoint was trained on {classes}")
    model = model.to(device, memory_format=torch.channels_last)
    results: dict = {"eval_set": cfg.data, "checkpoint": str(checkpoint)}
    if is_classifier:
        batches = DeviceBatches(ds.images.to(device), ds.labels.to(device), cfg.batch_size)
        r = evaluate_classifier(model, batches, len(classes), cfg.precision)
        results.update(class_results(r["confusion_matrix"], classes))
        results["loss"] = r["loss"]
        log(f"accuracy on {cfg.data}: {100 * results['accuracy']:.2f}% of {results['num_images']} images")
        log(format_class_table(results))
    if train_data is not None:
        bank = load_source(train_data, m.in_channels, m.height, m.width, cfg.cache_dir, train=True, log=log)
        if not bank.labelled or bank.classes != ds.classes:
            raise ConvaeError(f"--train-data {train_data} must be labelled with the classes of {cfg.data}")
        rep = representation_scores(model.encoder, bank.images, bank.labels, ds.images, ds.labels,
                                    len(ds.classes), cfg.precision, cfg.seed)
        rep.update({"encoder": f"{payload['kind']}'s, frozen", "bank": f"--train-data {train_data}",
                    "eval_set": cfg.data})
        results["representation"] = rep
        log(f"frozen encoder: kNN {100 * rep['knn_accuracy']:.2f}%, linear probe "
            f"{100 * rep['linear_probe_accuracy']:.2f}% on {cfg.data}")
    if cfg.out:
        run = RunDir(cfg.out)
        run.save_config(cfg)
        run.write_json("results.json", results)
        if is_classifier:
            visualise.save_confusion_matrix(results["confusion_matrix"], classes, run.figures / "confusion_matrix.png")
        if ds.skipped:
            run.write_lines("skipped.txt", ds.skipped)
        from .html_report import write_report

        write_report(run.path)
    return results
