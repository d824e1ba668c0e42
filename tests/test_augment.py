"""On-device augmentation: exact flips, crops inside the padding, reproducible streams."""

import torch

from convae.config import build_config
from convae.data.augment import AugmentConfig, augment, colour_jitter, cutout, random_crop, random_flip, step_generator


def test_a_flip_is_an_exact_mirror_or_nothing():
    x = torch.rand(64, 3, 8, 8)
    y = random_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(2)) for i in range(64)])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(64)])
    assert (flipped | kept).all() and 16 < int(flipped.sum()) < 48


def test_a_crop_stays_inside_the_padding():
    x = torch.arange(36.0).view(1, 1, 6, 6).repeat(50, 1, 1, 1) + 1  # no zeros in the image
    y = random_crop(x, 2, torch.Generator().manual_seed(0), mode="zeros")
    for i in range(50):
        nz = y[i, 0].nonzero()
        (r0, c0), (r1, c1) = nz.min(0).values.tolist(), nz.max(0).values.tolist()
        window = y[i, 0, r0 : r1 + 1, c0 : c1 + 1]
        # the visible part is a contiguous window of the original, shifted by at most 2 pixels
        assert (window != 0).all() and window.shape[0] >= 4 and window.shape[1] >= 4
        start = int(window[0, 0].item()) - 1
        r, c = divmod(start, 6)
        assert torch.equal(window, x[0, 0, r : r + window.shape[0], c : c + window.shape[1]])
        assert (r0 == 0 or r == 0) and (c0 == 0 or c == 0)
    reflect = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert (reflect > 0).all() and reflect.shape == x.shape


def test_jitter_keeps_the_range_and_augmentation_replays_from_its_seed():
    x = torch.rand(8, 3, 16, 16)
    j = colour_jitter(x, 0.4, torch.Generator().manual_seed(0))
    assert j.min() >= 0 and j.max() <= 1 and not torch.allclose(j, x)
    cfg = AugmentConfig(crop_padding=4, flip=True, jitter=0.2)
    dev = torch.device("cpu")
    a = augment(x, cfg, step_generator(dev, 3, 2, 7))
    b = augment(x, cfg, step_generator(dev, 3, 2, 7))
    c = augment(x, cfg, step_generator(dev, 3, 2, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.is_contiguous(memory_format=torch.channels_last)


def test_cutout_erases_one_square_per_image_with_its_mean_colour():
    x = torch.rand(200, 3, 10, 10) * 0.5 + 0.25
    y = cutout(x, 4, torch.Generator().manual_seed(0))
    changed = (y != x).any(1)  # (B, H, W): the erased pixels
    full = 0
    for i in range(200):
        rows, cols = changed[i].any(1).nonzero().flatten(), changed[i].any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4  # a square, smaller where it meets a border
        assert changed[i].sum() == len(rows) * len(cols)  # every pixel of the rectangle, nothing else
        assert (rows.diff() == 1).all() and (cols.diff() == 1).all()
        box = y[i][:, rows][:, :, cols]
        assert torch.allclose(box, x[i].mean((1, 2))[:, None, None].expand_as(box))
        full += len(rows) == len(cols) == 4
    assert 50 < full < 150  # the centre is uniform over the image: a third of the squares lose a border
    assert torch.equal(cutout(x, 0, None), x)


def test_cutout_is_for_the_classifier_only():
    cfg = build_config("blocks", overrides={"cutout": 8})
    assert cfg.augment_config(classify=True).cutout == 8 and cfg.augment_config().cutout == 0


def test_a_run_cuts_out_in_fine_tuning_and_not_in_pretraining(image_folder, cache_dir, tmp_path, monkeypatch):
    import convae.training.loop
    from convae.cli import main

    seen = []
    real = convae.training.loop.augment
    monkeypatch.setattr(convae.training.loop, "augment", lambda x, cfg, g: seen.append(cfg.cutout) or real(x, cfg, g))
    assert (
        main(
            [
                "run",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(tmp_path / "r"),
                "--height",
                "16",
                "--width",
                "16",
                "--channels",
                "8",
                "16",
                "--latent-dim",
                "32",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.2",
                "--device",
                "cpu",
                "--pretrain-epochs",
                "1",
                "--finetune-epochs",
                "1",
                "--augment",
                "--cutout",
                "4",
            ]
        )
        == 0
    )
    first = seen.index(4)
    assert first > 0 and set(seen[:first]) == {0} and set(seen[first:]) == {4}
