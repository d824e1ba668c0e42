"""Figures: curves, first-layer kernel grids, reconstructions, the confusion matrix, the
label-efficiency plot and the embedding map; and the sets of them each phase writes."""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import torch

from ..utils.errors import ConvaeError, clip, first_line
from ..utils.files import atomic_write_bytes
from ..utils.records import loss_terms


@functools.cache
def _pyplot():
    """matplotlib's pyplot, imported when the first figure is drawn: with torchvision it took more than
    half of every command's start (``convae --version`` 7.1 s against 3.8 s) where nothing is drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed on servers
    import matplotlib.pyplot as plt

    return plt


def make_grid(images: torch.Tensor, **kwargs) -> torch.Tensor:
    """torchvision's image grid (imported here, as pyplot is)."""
    from torchvision.utils import make_grid as grid

    return grid(images, **kwargs)


def _save(fig, path: Path) -> None:
    """Rendered in memory, then written whole under its name (a link there is replaced, not followed)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _show_grid(ax, grid: torch.Tensor) -> None:
    """An image grid (3 or 1, H, W) in [0, 1], pixel for pixel (grey when 1 channel)."""
    img = grid.permute(1, 2, 0).numpy()
    rgb = img.shape[2] == 3
    ax.imshow(img if rgb else img[:, :, 0], cmap=None if rgb else "gray", interpolation="none")


def plot_curve(series: dict[str, list[float]], path: Path, ylabel: str, title: str) -> None:
    """Per-epoch curves (epochs counted from 1), one line per named series."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _pyplot().subplots(figsize=(5, 3.5))
    for (name, values), style in zip(series.items(), ("g-o", "b--s", "r-o")):
        ax.plot(range(1, len(values) + 1), values, style, label=label(name))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(label(title))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    _save(fig, path)


def kernel_grid(weight: torch.Tensor) -> torch.Tensor:
    """First-layer kernels (out, in, k, k) as one image grid (3 or 1, H, W) in [0, 1].

    As in the lecture, the magnitude |w| is shown; it is scaled by the grid's largest
    magnitude so that small kernels stay visible (the lecture's raw values would be near black).
    """
    w = weight.detach().float().cpu().abs()
    if w.shape[1] not in (1, 3):
        w = w[:, :3] if w.shape[1] > 3 else w[:, :1]
    nrow = math.ceil(math.sqrt(w.shape[0]))  # 8 x 8 for the seed model's 64 kernels
    peak = float(w.max()) or 1.0
    return make_grid(w / peak, nrow=nrow, padding=1, pad_value=1.0)


def save_kernels(weight: torch.Tensor, path: Path, title: str) -> None:
    grid = kernel_grid(weight)
    fig, ax = _pyplot().subplots(figsize=(5, 5))
    _show_grid(ax, grid)
    ax.set_title(label(title), fontsize=10)
    ax.axis("off")
    _save(fig, path)


def reconstruction_grid(originals: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """One image grid: ``originals`` in the top row, each of ``rows`` below, clamped to [0, 1]."""
    shown = torch.cat([originals.float().cpu(), *(r.float().cpu().clamp(0, 1) for r in rows.values())])
    return make_grid(shown, nrow=originals.shape[0], padding=2, pad_value=1.0)


def save_reconstructions(
    originals: torch.Tensor, rows: torch.Tensor | dict[str, torch.Tensor], path: Path, set_name: str = "evaluation"
) -> None:
    """Images in [0, 1] (N, C, H, W): originals (of ``set_name``) in the top row, below them each of
    ``rows`` (name -> images, as an objective's ``examples`` gives them; a tensor: reconstructions)."""
    rows = {"reconstruction": rows} if isinstance(rows, torch.Tensor) else rows
    n = originals.shape[0]
    fig, ax = _pyplot().subplots(figsize=(max(6, n * 0.6), 1 + len(rows)))
    _show_grid(ax, reconstruction_grid(originals, rows))
    ax.set_title(f"{label(set_name)} images (top), then: {label(', '.join(rows))}", fontsize=9)
    ax.axis("off")
    _save(fig, path)


MAX_FIGURE_INCHES = 18.0  # ~2,000 pixels a side: the size of a figure never follows the data unbounded
MAX_LEGEND = 20  # classes named in a legend


def label(text: object) -> str:
    """A name drawn as it is: matplotlib reads a $...$ pair as a formula (and raises on a lone one)."""
    return str(text).replace("$", r"\$")


def save_confusion_matrix(cm: list[list[int]], classes: list[str], path: Path) -> None:
    """Rows are true classes, columns predictions; each cell shows its count (up to 30 classes)."""
    k = len(classes)
    m = torch.tensor(cm, dtype=torch.float64)
    rates = m / m.sum(1, keepdim=True).clamp(min=1)
    size = min(max(4.0, 0.55 * k + 2), MAX_FIGURE_INCHES)
    fig, ax = _pyplot().subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(int(m[i, j])),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
        ax.set_xticks(range(k), [label(c) for c in classes], rotation=45, ha="right", fontsize=9)
        ax.set_yticks(range(k), [label(c) for c in classes], fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (counts; colour = row rate)", fontsize=10)
    _save(fig, path)


def save_label_efficiency(result: dict, path: Path) -> None:
    """Accuracy against labelled images per class (log x), one line per method, std error bars.

    ``result`` is ``sweep.json``'s content; its ``methods`` name the lines.
    """
    full = result["images_per_class_all"]
    xs = {b: (full if b == "all" else b) for b in result["budgets"]}
    fig, ax = _pyplot().subplots(figsize=(6.5, 4.2))
    for method, name in result["methods"].items():
        rows = sorted((r for r in result["summary"] if r["method"] == method), key=lambda r: xs[r["labels_per_class"]])
        if not rows:
            continue
        ax.errorbar(
            [xs[r["labels_per_class"]] for r in rows],
            [100 * r["mean"] for r in rows],
            yerr=[100 * r["std"] for r in rows],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # the budgets are the ticks; no 2x10^1 labels
    ticks = sorted(xs.values())
    ax.set_xticks(ticks, [f"all ({full})" if t == full and "all" in xs else str(t) for t in ticks])
    ax.set_xlabel("labelled images per class (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"label efficiency, mean ± std over {len(result['seeds'])} seed(s)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside, not over, the lines
    _save(fig, path)


def save_cell_curves(result: dict, path: Path, against: str = "steps") -> None:
    """Every trained cell's evaluation accuracy along its training (``convae sweep --curves``) against its
    optimizer steps, or (``against="seconds"``) its training time where the curve has it: one panel per budget,
    one colour per method, one line per seed."""
    x = 0 if against == "steps" else 2
    budgets = [
        b for b in result["budgets"] if any("curve" in c and c["labels_per_class"] == b for c in result["cells"])
    ]
    fig, axes = _pyplot().subplots(1, len(budgets), figsize=(3.6 * len(budgets) + 2.2, 3.4), squeeze=False, sharey=True)
    colours = {m: f"C{i}" for i, m in enumerate(result["methods"])}
    for ax, budget in zip(axes[0], budgets):
        seen = set()
        for c in result["cells"]:
            if c["labels_per_class"] != budget or "curve" not in c or any(len(p) <= x for p in c["curve"]):
                continue
            m = c["method"]
            ax.plot(
                [p[x] for p in c["curve"]],
                [100 * p[1] for p in c["curve"]],
                color=colours[m],
                marker=".",
                alpha=0.8,
                label=None if m in seen else result["methods"][m],
            )
            seen.add(m)
        ax.set_title(f"{budget} / class", fontsize=10)
        ax.set_xlabel("optimizer steps" if against == "steps" else "training seconds")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    _save(fig, path)


MIN_MAP_POINTS = 5


def embedding_map(features, seed: int = 0):
    """2-D t-SNE coordinates (scikit-learn) of features (N, D); PCA to 50 dimensions first."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("the features are not all finite numbers")
    if len(np.unique(x.round(6), axis=0)) < MIN_MAP_POINTS:  # scikit-learn's t-SNE crashes on identical points
        raise ValueError(f"fewer than {MIN_MAP_POINTS} distinct embeddings (identical images?)")
    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)


def attempt(log, what: str, draw) -> bool:
    """Draw one figure; one that cannot be drawn (too few points for t-SNE, a degenerate input)
    is skipped with a line in the log, and the run writes everything else. A failed file
    write is not a drawing problem and still stops the run."""
    try:
        draw()
        return True
    except (OSError, ConvaeError):
        raise
    except Exception as e:
        log(f"warning: {what} was not drawn ({type(e).__name__}: {clip(first_line(e), 100)})")
        return False


def map_points(n: int, max_points: int, seed: int):
    """The positions of the (at most ``max_points``, seeded) images a map of ``n`` shows."""
    import numpy as np

    return np.random.default_rng(seed).permutation(n)[:max_points] if n > max_points else np.arange(n)


def save_embedding_map(
    features,
    labels,
    classes: list[str],
    path: Path,
    title: str,
    max_points: int = 3000,
    seed: int = 0,
    picked: bool = False,
) -> None:
    """A t-SNE map of (at most ``max_points``, seeded: :func:`map_points`) embeddings, coloured by
    class; ``picked``: ``features`` are those points already, in that order."""
    import numpy as np

    n = len(features)
    if n < MIN_MAP_POINTS:
        raise ValueError(f"t-SNE needs at least {MIN_MAP_POINTS} images, the set has {n}")
    pick = np.arange(n) if picked else map_points(n, max_points, seed)
    xy = embedding_map(np.asarray(features)[pick], seed)
    fig, ax = _pyplot().subplots(figsize=(6, 5.5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.6)
    else:
        lab = np.asarray(labels)[pick]
        cmap = _pyplot().get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for k, name in enumerate(classes):
            sel = lab == k
            ax.scatter(xy[sel, 0], xy[sel, 1], s=3, alpha=0.7, color=cmap(k % cmap.N), label=label(name))
        if len(classes) <= MAX_LEGEND:
            ax.legend(markerscale=4, fontsize=7, loc="best", ncol=2 if len(classes) > 10 else 1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{label(title)} (t-SNE of {len(pick)} images)", fontsize=10)
    _save(fig, path)


def save_pretrain_figures(
    folder: Path,
    initial: torch.Tensor,
    pretrained: torch.Tensor,
    history: list[dict],
    originals: torch.Tensor,
    rows: torch.Tensor | dict[str, torch.Tensor],
    eval_name: str = "evaluation set",
) -> None:
    """The pretraining phase's figures: kernels before, after and their change, the loss
    curves, and evaluation images over what the objective gives the network and its output."""
    save_kernels(initial, folder / "kernels_initial.png", "first-layer kernels, initial (random)")
    save_kernels(pretrained, folder / "kernels_pretrained.png", "first-layer kernels after pretraining")
    delta = initial - pretrained
    save_kernels(
        delta, folder / "kernels_pretrain_delta.png", _change("change in pretraining (initial - pretrained)", delta)
    )
    if history:
        plot_curve(
            {"train": [h["train_loss"] for h in history], eval_name: [h["val_loss"] for h in history]},
            folder / "pretrain_loss.png",
            "loss per pixel",
            "autoencoder pretraining",
        )
    save_reconstructions(originals, rows, folder / "reconstructions.png", eval_name)


def _change(title: str, delta: torch.Tensor) -> str:
    """A kernel change's title; where nothing changed (a fixed first layer: the blocks network's whitening stem
    is fitted to the data, not trained), said, so a grid of black squares is not read as a fault."""
    if delta.numel() and not bool(delta.abs().max()):
        return f"{title}: none, the first layer is fixed (fitted to the data, not trained)"
    return title


def save_finetune_figures(
    folder: Path,
    before: torch.Tensor,
    after: torch.Tensor,
    origin: str,
    history: list[dict],
    eval_name: str,
    confusion: list[list[int]],
    classes: list[str],
) -> None:
    """The fine-tuning phase's figures: kernels after and their change, loss and accuracy
    curves, and the confusion matrix."""
    save_kernels(after, folder / "kernels_finetuned.png", "first-layer kernels after fine-tuning")
    delta = before - after
    save_kernels(
        delta, folder / "kernels_finetune_delta.png", _change(f"change in fine-tuning ({origin} - fine-tuned)", delta)
    )
    if history:
        curves = {"train": [h["train_loss"] for h in history], eval_name: [h["val_loss"] for h in history]}
        for name in loss_terms(history[0]):  # each named term of the loss (joint training's two)
            curves[f"train {name}"] = [h.get(f"train_{name}", float("nan")) for h in history]
        plot_curve(curves, folder / "finetune_loss.png", "loss", "classifier fine-tuning")
        plot_curve(
            {f"accuracy on the {eval_name}": [100 * h["val_accuracy"] for h in history]},
            folder / "finetune_accuracy.png",
            "accuracy (%)",
            f"accuracy on the {eval_name}",
        )
    save_confusion_matrix(confusion, classes, folder / "confusion_matrix.png")
