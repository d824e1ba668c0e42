"""Evaluation: reconstruction error, accuracy, per-class accuracy and the confusion matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DeviceBatches
from ..data.augment import step_generator
from ..data.images import printable
from ..models.objectives import Objective, ObjectiveConfig, Reconstruct
from ..utils import cores
from ..utils.device import autocast
from ..utils.records import Evaluation, Results


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module, batches: DeviceBatches, precision: str = "fp32", objective: Objective | None = None, seed: int = 0
) -> float:
    """Mean loss per pixel over every image of ``batches``: the MSE of the reconstruction, or
    ``objective``'s loss with the same corruption on every call (seeded per batch)."""
    model.eval()
    device = batches.device
    objective = objective or Reconstruct(ObjectiveConfig())
    total = torch.zeros((), device=device, dtype=torch.float64)
    for i, (x, _) in enumerate(batches):
        g = step_generator(device, seed, 0, i) if objective.random else None
        with autocast(device, precision):
            total += objective.summed(model, x, g)
        cores.poll()
    return float(total) / batches.num_images


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, batches: DeviceBatches, num_classes: int, precision: str = "fp32"
) -> Evaluation:
    """Mean cross-entropy, accuracy and confusion matrix (rows: true, columns: predicted)."""
    model.eval()
    device = batches.device
    loss = torch.zeros((), device=device, dtype=torch.float64)
    cm = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for x, y in batches:
        with autocast(device, precision):
            logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        cm += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        cores.poll()
    cm = cm.view(num_classes, num_classes).cpu()
    n = int(cm.sum())
    return {
        "loss": float(loss) / max(n, 1),
        "accuracy": float(cm.diag().sum()) / max(n, 1),
        "confusion_matrix": cm.tolist(),
    }


def class_results(confusion: list[list[int]], classes: list[str]) -> Results:
    """Overall and per-class accuracy from a confusion matrix."""
    cm = torch.tensor(confusion)
    totals = cm.sum(1)
    correct = cm.diag()
    per_class = {
        name: {
            "accuracy": (float(correct[i]) / float(totals[i])) if totals[i] else None,
            "correct": int(correct[i]),
            "total": int(totals[i]),
        }
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


def format_class_table(results: Results) -> str:
    """The lecture's per-class printout, as a table."""
    names = {name: printable(name) for name in results["per_class"]}  # one line per class, whatever its name
    width = max(8, *(len(n) for n in names.values()))
    lines = [f"{'class':<{width}}  {'correct':>7}  {'total':>6}  accuracy"]
    for name, r in results["per_class"].items():
        acc = "   n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:6.2f} %"
        lines.append(f"{names[name]:<{width}}  {r['correct']:>7}  {r['total']:>6}  {acc}")
    lines.append(
        f"{'overall':<{width}}  {sum(r['correct'] for r in results['per_class'].values()):>7}  "
        f"{results['num_images']:>6}  {100 * results['accuracy']:6.2f} %"
    )
    return "\n".join(lines)
