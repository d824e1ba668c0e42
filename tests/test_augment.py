"""On-device augmentation: exact flips, crops inside the padding, reproducible streams."""

import torch

from convae.augment import AugmentConfig, augment, colour_jitter, random_crop, random_flip, step_generator


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
