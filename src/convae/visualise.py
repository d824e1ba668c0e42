"""Figures: curves, first-layer kernel grids, reconstructions and the confusion matrix."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curve(values: list[float], path: Path, ylabel: str, title: str, label: str, color: str = "g") -> None:
    """A per-epoch curve (epochs counted from 1)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(values) + 1), values, f"{color}-o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
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
    fig, ax = plt.subplots(figsize=(5, 5))
    img = grid.permute(1, 2, 0).numpy()
    ax.imshow(img if img.shape[2] == 3 else img[:, :, 0], cmap=None if img.shape[2] == 3 else "gray",
              interpolation="none")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    _save(fig, path)


def save_reconstructions(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path) -> None:
    """Images in [0, 1] (N, C, H, W): originals in the top row, reconstructions below."""
    n = originals.shape[0]
    both = torch.cat([originals.float().cpu(), reconstructions.float().cpu().clamp(0, 1)])
    grid = make_grid(both, nrow=n, padding=2, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(max(6, n * 0.6), 2))
    img = grid.permute(1, 2, 0).numpy()
    ax.imshow(img if img.shape[2] == 3 else img[:, :, 0], cmap=None if img.shape[2] == 3 else "gray",
              interpolation="none")
    ax.set_title("validation images (top) and their reconstructions (bottom)", fontsize=9)
    ax.axis("off")
    _save(fig, path)


def save_confusion_matrix(cm: list[list[int]], classes: list[str], path: Path) -> None:
    """Rows are true classes, columns predictions; each cell shows its count."""
    k = len(classes)
    m = torch.tensor(cm, dtype=torch.float64)
    rates = m / m.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (counts; colour = row rate)", fontsize=10)
    _save(fig, path)
