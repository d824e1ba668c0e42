"""What a sweep can measure: its methods (one per way of making a classifier from a labelled subset, a training
mode's among them as registered) and its label budgets."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.modes import TRAINING_MODES
from ..utils.errors import ConvaeError


@dataclass(frozen=True)
class Method:
    """One way of making a classifier from the labelled subset of a cell."""

    label: str
    probe: str  # "recipe" (the fine-tuning recipe trains a classifier), "knn" or "logistic" (frozen features)
    weights: str  # the encoder's: "pretrained" or "random"
    frozen: bool = False  # recipe: only the head trains (a linear probe with the recipe's steps)
    joint: str = "off"  # recipe: joint training of this variant (convae.joint), every training image unlabelled


def methods() -> dict[str, Method]:
    """Every method a sweep can measure, in the order its tables show them: the recipe's; per training mode that
    reads the unlabelled images (as registered now) one ``joint_<mode>`` from random init and one from the
    pretrained autoencoder (``finetune_<mode>``; plain's is ``joint_finetune``); the frozen-feature probes."""
    unlabelled = [m for m in TRAINING_MODES.values() if m.unlabelled]
    joint = {f"joint_{m.name}": Method(f"joint, {m.label}", "recipe", "random", joint=m.name) for m in unlabelled}
    pretrained = {
        m.pretrained_method or f"finetune_{m.name}": Method(
            f"pretrained, joint {m.label}", "recipe", "pretrained", joint=m.name
        )
        for m in unlabelled
    }
    return {
        "finetune": Method("pretrained, fine-tuned", "recipe", "pretrained"),
        "linear_probe": Method("pretrained, frozen (linear probe)", "recipe", "pretrained", frozen=True),
        "scratch": Method("random init (scratch)", "recipe", "random"),
        **joint,
        **pretrained,
        "knn": Method("pretrained, frozen (kNN, k=200)", "knn", "pretrained"),
        "logistic_probe": Method("pretrained, frozen (logistic regression)", "logistic", "pretrained"),
        "knn_random": Method("random weights, frozen (kNN, k=200)", "knn", "random"),
        "logistic_random": Method("random weights, frozen (logistic regression)", "logistic", "random"),
    }


DEFAULT_BUDGETS = ["25", "100", "400", "all"]
# cells of a recipe without --epoch-images train this many steps: its epochs would give 250 labels a step each
FIXED_STEPS = 300


def parse_budgets(values: list[str]) -> list[int | None]:
    """``["25", "all"]`` -> ``[25, None]`` (None = every labelled training image)."""
    out: list[int | None] = []
    for v in values:
        if str(v).lower() == "all":
            if None in out:
                raise ConvaeError(
                    "the label budget 'all' is given twice; each budget is measured once per seed",
                    advice="list each --labels-per-class value once",
                )
            out.append(None)
            continue
        try:
            n = int(v)
        except ValueError:
            n = 0
        if n <= 0:
            raise ConvaeError(
                f"label budgets are integers > 0 or 'all'; got {v!r}",
                advice="--labels-per-class takes integers > 0 or 'all'",
            )
        if n in out:
            raise ConvaeError(
                f"the label budget {v} is given twice; each budget is measured once per seed",
                advice="list each --labels-per-class value once",
            )
        out.append(n)
    return out


def chosen_methods(names: list[str] | None) -> dict[str, Method]:
    """The methods ``names`` asks for (None: every one), in the order the tables show them."""
    known = methods()
    unknown = sorted(set(names or ()) - set(known))
    if unknown or names == []:
        raise ConvaeError(
            f"unknown sweep method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}"
        )
    return {m: spec for m, spec in known.items() if names is None or m in names}
