"""Tiny generated datasets: a few coloured images per class, written as real image files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# the CIFAR-10 training archive one test reads a slice of: CONVAE_TEST_ARCHIVE, or beside the checkout
SHARED_ARCHIVE = Path(
    os.environ.get("CONVAE_TEST_ARCHIVE")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
)

# each class has its own dominant colour, so a classifier can learn something in a few steps
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 220, 40)]


def make_image(rng: np.random.Generator, colour, size=(16, 16), mode="RGB") -> Image.Image:
    h, w = size
    base = np.array(colour, dtype=np.float64)[None, None, :]
    noise = rng.normal(0, 30, size=(h, w, 3))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def make_image_folder(
    root: Path,
    classes: int = 3,
    per_class: int = 10,
    size=(16, 16),
    labelled: bool = True,
    ext: str = ".png",
    seed: int = 0,
) -> Path:
    """``root/class_k/img_i.ext`` (labelled) or ``root/img_i.ext`` (unlabelled)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(classes):
        folder = root / f"class_{k}" if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(rng, COLOURS[k % len(COLOURS)], size).save(folder / f"img_{k}_{i:03d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    # keep the tests' output readable and deterministic
    monkeypatch.setenv("TQDM_DISABLE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
