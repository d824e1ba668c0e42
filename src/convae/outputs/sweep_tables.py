"""A sweep's results as tables: mean and spread per method and budget, its CSV and its text table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..utils.records import SweepCell


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


def write_csv(path: Path, summary: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "labels_per_class", "mean", "std", "n"])
        w.writeheader()
        w.writerows(summary)


def format_summary(result: dict) -> str:
    """Accuracy mean +- std (%), one row per method, one column per budget."""
    budgets = result["budgets"]
    cell = {(r["method"], r["labels_per_class"]): r for r in result["summary"]}
    head = f"{'method':<52}" + "".join(f"{str(b) + '/class':>16}" for b in budgets)
    lines = [head]
    for method, name in result["methods"].items():
        vals = []
        for b in budgets:
            r = cell.get((method, b))
            vals.append(
                ""
                if not r
                else f"{100 * r['mean']:6.2f} +- {100 * r['std']:4.2f}"
                if r["n"] > 1
                else f"{100 * r['mean']:6.2f}"
            )
        lines.append(f"{name:<52}" + "".join(f"{v:>16}" for v in vals))
    return "\n".join(lines)
