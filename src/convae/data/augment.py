"""Augmentation on the device: batched tensor operations on a batch already in memory.

Random crop with padding, horizontal flip, optional colour jitter and (for a classifier) Cutout, drawn per image from
a generator seeded by (seed, epoch, step), so a resumed run sees the same augmented batches.
No per-image Python and no DataLoader: each operation is one indexing or arithmetic call
over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils.knobs import Flag, Int, Num, knob


@dataclass(frozen=True)
class AugmentKnobs:
    """The augmentation as the run config holds it (``Config`` inherits these fields)."""

    augment: bool = knob(
        False,
        Flag(),
        "random crop, flip (and --jitter) on the device, for pretraining and fine-tuning",
        group="augment",
    )
    crop_padding: int = knob(4, Int(0), "augment: padding of the random crop (default 4)", group="augment", metavar="P")
    jitter: float = knob(
        0.0,
        Num(0, hi=1),  # a factor of 1 - J of 0 or below turns an image black
        "augment: colour jitter strength, below 1 (default 0 = off)",
        group="augment",
        metavar="J",
    )
    cutout: int = knob(
        0,
        Int(0),
        "augment: side of a square erased at a random place in every image a classifier "
        "trains on (Cutout; default 0 = off)",
        group="augment",
        metavar="S",
    )


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 4  # pixels of padding for the random crop (0 = no crop)
    flip: bool = True  # horizontal flip with probability 1/2
    jitter: float = 0.0  # colour jitter strength: brightness, contrast and saturation factors in [1-j, 1+j]
    pad_mode: str = "reflect"  # "reflect" or "zeros"
    cutout: int = 0  # side of the square Cutout erases (0 = none)


def step_generator(device: torch.device, seed: int, epoch: int, step: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch, step): replayable after a resume."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + step)
    return g


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None, mode: str = "reflect"
) -> torch.Tensor:
    """Each image cropped back to its size at a random offset in its padded copy."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    p = padding if mode == "zeros" or padding < min(h, w) else min(h, w) - 1
    padded = F.pad(x, (p, p, p, p), mode="constant" if mode == "zeros" else "reflect")
    dy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def colour_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast and saturation scaled per image by factors in [1 - s, 1 + s]."""
    if strength <= 0:
        return x
    b = x.shape[0]

    def factor() -> torch.Tensor:
        u = torch.rand(b, 1, 1, 1, generator=generator, device=x.device, dtype=x.dtype)
        return 1 + strength * (2 * u - 1)

    x = x * factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    if x.shape[1] == 3:
        grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        x = (x - grey) * factor() + grey
    return x.clamp(0, 1)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): in each image a size x size square around a uniformly drawn centre
    (cut off at the borders, so a corner square can be smaller) set to the image's mean colour."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), generator=generator, device=x.device) - size // 2
    cx = torch.randint(0, w, (b, 1), generator=generator, device=x.device) - size // 2
    rows, cols = torch.arange(h, device=x.device)[None], torch.arange(w, device=x.device)[None]
    inside = ((rows >= cy) & (rows < cy + size))[:, :, None] & ((cols >= cx) & (cols < cx + size))[:, None, :]
    return torch.where(inside[:, None], x.mean(dim=(2, 3), keepdim=True), x)


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` (B, C, H, W) in [0, 1], cropped, flipped, jittered and cut out; channels_last like the input."""
    x = random_crop(x, cfg.crop_padding, generator, cfg.pad_mode)
    if cfg.flip:
        x = random_flip(x, generator)
    x = colour_jitter(x, cfg.jitter, generator)
    x = cutout(x, cfg.cutout, generator)
    return x.contiguous(memory_format=torch.channels_last)
