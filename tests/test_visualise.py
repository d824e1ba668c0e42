"""Figures as units: what each draws, checked in the pixels and the grids, not only that a file exists."""

import numpy as np
import pytest
import torch
from PIL import Image

from convae.outputs import figures as visualise


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_kernel_grid_is_8x8_of_3x3_magnitudes_scaled_by_the_largest():
    w = torch.zeros(64, 3, 3, 3)
    w[0, 0, 1, 1] = -2.0  # the largest magnitude: shown at full scale
    w[63, 2, 0, 0] = 1.0
    grid = visualise.kernel_grid(w)
    assert grid.shape == (3, 8 * 4 + 1, 8 * 4 + 1)  # 3x3 kernels with 1-pixel padding
    assert grid[0, 1 + 1, 1 + 1] == 1.0  # |w| / max |w|
    last = 1 + 7 * 4  # the 64th kernel's top-left pixel
    assert grid[2, last, last] == pytest.approx(0.5)
    assert grid[1, 1 + 1, 1 + 1] == 0.0


def test_kernel_grid_of_grey_and_wide_inputs():
    assert visualise.kernel_grid(torch.rand(16, 1, 3, 3)).shape[0] == 3  # make_grid repeats one channel
    assert visualise.kernel_grid(torch.rand(8, 5, 3, 3)).shape[0] == 3  # the first three channels


def test_reconstructions_show_originals_over_reconstructions(tmp_path):
    originals = torch.zeros(4, 3, 8, 8)
    originals[:, 0] = 1.0  # red on top
    recon = torch.zeros(4, 3, 8, 8)
    recon[:, 2] = 1.0  # blue below
    path = tmp_path / "r.png"
    visualise.save_reconstructions(originals, recon, path)
    img = _png(path).astype(int)
    red = (img[..., 0] > 200) & (img[..., 2] < 60)
    blue = (img[..., 2] > 200) & (img[..., 0] < 60)
    assert red.any() and blue.any()
    assert np.nonzero(red)[0].mean() < np.nonzero(blue)[0].mean()


def test_reconstructions_draw_one_row_per_named_row(tmp_path):
    originals = torch.zeros(4, 3, 8, 8)
    originals[:, 0] = 1.0
    rows = {"masked input": torch.zeros(4, 3, 8, 8), "prediction": torch.zeros(4, 3, 8, 8)}
    rows["masked input"][:, 1] = 1.0  # green in the middle
    rows["prediction"][:, 2] = 1.0  # blue at the bottom
    path = tmp_path / "r.png"
    visualise.save_reconstructions(originals, rows, path)
    img = _png(path).astype(int)
    ys = [
        np.nonzero((img[..., c] > 200) & (img[..., (c + 1) % 3] < 60) & (img[..., (c + 2) % 3] < 60))[0].mean()
        for c in range(3)
    ]
    assert ys[0] < ys[1] < ys[2]


def test_confusion_matrix_and_curves_and_label_efficiency(tmp_path):
    visualise.save_confusion_matrix([[5, 1], [0, 4]], ["a", "b"], tmp_path / "cm.png")
    visualise.plot_curve({"train": [1.0, 0.5, 0.25]}, tmp_path / "c.png", "loss", "t")
    result = {
        "images_per_class_all": 100,
        "budgets": [10, "all"],
        "seeds": [0, 1],
        "methods": {"finetune": "pretrained, fine-tuned", "scratch": "random init (scratch)"},
        "summary": [
            {"method": m, "labels_per_class": b, "mean": 0.5, "std": 0.01, "n": 2}
            for m in ("finetune", "scratch")
            for b in (10, "all")
        ],
    }
    visualise.save_label_efficiency(result, tmp_path / "le.png")
    for name in ("cm.png", "c.png", "le.png"):
        img = _png(tmp_path / name)
        assert img.shape[0] > 100 and img.std() > 10  # drawn, not blank


def test_phase_figure_sets(tmp_path):
    k0, k1 = torch.rand(8, 3, 3, 3), torch.rand(8, 3, 3, 3)
    x = torch.rand(4, 3, 8, 8)
    history = [{"train_loss": 0.2, "val_loss": 0.3}, {"train_loss": 0.1, "val_loss": 0.2}]
    visualise.save_pretrain_figures(tmp_path, k0, k1, history, x, x)
    assert {p.name for p in tmp_path.iterdir()} == {
        "kernels_initial.png",
        "kernels_pretrained.png",
        "kernels_pretrain_delta.png",
        "pretrain_loss.png",
        "reconstructions.png",
    }
    ft = tmp_path / "ft"
    history = [{"train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5}]
    visualise.save_finetune_figures(ft, k0, k1, "pretrained", history, "validation split", [[1, 0], [0, 1]], ["a", "b"])
    assert {p.name for p in ft.iterdir()} == {
        "kernels_finetuned.png",
        "kernels_finetune_delta.png",
        "finetune_loss.png",
        "finetune_accuracy.png",
        "confusion_matrix.png",
    }


def test_embedding_map_is_seeded_and_coloured_by_class(tmp_path):
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (40, 6)), rng.normal(8, 1, (40, 6))]).astype(np.float32)
    a, b = visualise.embedding_map(feats, seed=3), visualise.embedding_map(feats, seed=3)
    np.testing.assert_allclose(a, b)
    # the two well-separated groups stay apart in the map
    gap = np.linalg.norm(a[:40].mean(0) - a[40:].mean(0))
    assert gap > 2 * max(a[:40].std(0).max(), a[40:].std(0).max())
    visualise.save_embedding_map(feats, np.repeat([0, 1], 40), ["x", "y"], tmp_path / "m.png", "t")
    assert _png(tmp_path / "m.png").std() > 10


def test_a_kernel_change_of_nothing_says_the_first_layer_is_fixed():
    from convae.outputs.figures import _change

    assert "none, the first layer is fixed" in _change("change in fine-tuning", torch.zeros(4, 3, 2, 2))
    assert _change("change in fine-tuning", torch.full((4, 3, 2, 2), 1e-3)) == "change in fine-tuning"
