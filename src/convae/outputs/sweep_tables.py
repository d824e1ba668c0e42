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


def budget_heading(result: dict, b, sep: str = "/") -> str:
    """``25/class``; marked ``*`` where a class holds fewer training images than the budget (see
    :func:`capped_note`)."""
    return f"{b}{sep}class" + ("*" if str(b) in _capped(result) else "")


def _capped(result: dict) -> dict:
    capped = result.get("capped")  # a sweep.json is read as untrusted: anything else is no note
    return {k: v for k, v in capped.items() if isinstance(v, dict)} if isinstance(capped, dict) else {}


def capped_note(result: dict) -> str:
    """What a ``*`` budget trained on: every image of the classes that hold fewer, not the budget."""
    capped = _capped(result)
    if not capped:
        return ""
    parts = [f"{b}/class: {c.get('labelled_images')} labelled images" for b, c in capped.items()]
    fewest = min((c.get("fewest") for c in capped.values()), key=str)
    return (
        f"* a class holds only {fewest} training image(s): every one of them is used, so these budgets trained on "
        f"fewer than the budget times the classes ({'; '.join(parts)})"
    )


def format_summary(result: dict) -> str:
    """Accuracy mean +- std (%), one row per method, one column per budget."""
    budgets = result["budgets"]
    cell = {(r["method"], r["labels_per_class"]): r for r in result["summary"]}
    head = f"{'method':<52}" + "".join(f"{budget_heading(result, b):>16}" for b in budgets)
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
    note = capped_note(result)
    return "\n".join(lines + ([note] if note else []))
