"""Strong augmentation on the device: RandAugment with a random magnitude per operation, then Cutout, per image.

The strong view of consistency training (FixMatch, FlexMatch, FreeMatch): each image gets ``ops`` operations
drawn with replacement from the 14 of FixMatch's RandAugment pool, each at a magnitude drawn uniformly from the
operation's range (the ranges of the USB benchmark's ``RandAugment(3, 5)`` for CIFAR, which its 95 % at 250
labels were measured with), then a square of side up to ``cutout`` of the image's erased to grey.

Batched, with no per-image Python: for every operation slot the images are grouped by the operation they drew,
each group transformed in one call; the geometric ones (rotate, shear, translate) of a slot share one
``grid_sample`` with a matrix per image. Every draw comes from the step's generator, so a resumed run replays
the same views. The photometric operations follow PIL's definitions (what the reference implementations call),
on [0, 1] floats; the geometric ones turn about the image's centre (PIL's shear and translate about its
corner: a shift of the same distribution), nearest-neighbour with black fill as PIL's default.
Measured against torchvision's RandAugment, image by image, in BENCHMARKS.md ("Strong augmentation").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images (n, C, H, W), magnitudes (n,)) -> images


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` (ITU-R 601-2 luma) as (n, 1, H, W); a one-channel image is its own."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageEnhance``: ``degenerate + factor * (x - degenerate)``, clipped."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 1)


def identity(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x


def autocontrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each channel stretched so its darkest pixel is 0 and its brightest 1 (a flat channel kept)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=1e-12), x)


def equalize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation per channel on 256 levels: ``lut[i] = (step // 2 + #pixels below i) //
    step``, ``step`` the pixels outside the brightest level used, over 255 (no step: the channel kept)."""
    n, c, h, w = x.shape
    q = (x * 255).round().long().clamp(0, 255).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    last = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255  # (n*c, 1)
    below = hist.cumsum(dim=1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return (out.float() / 255).reshape(n, c, h, w).to(x.dtype)


def brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, v)


def color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Saturation: blended with the image's grey version."""
    return _blend(_grey(x).expand_as(x), x, v)


def contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blended with a flat image of the mean grey level."""
    return _blend(_grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), x, v)


def sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blended with PIL's SMOOTH filter (3x3, centre 5, the rest 1, over 13) of the image; the border kept."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(smooth, x, v)


def posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Only the top ``v`` (4 to 8) bits of each 8-bit value kept."""
    bits = v.floor().clamp(1, 8).long().view(-1, 1, 1, 1)
    drop = 2 ** (8 - bits)
    q = (x * 255).round().long()
    return ((q // drop) * drop).to(x.dtype) / 255


def solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Every 8-bit value at or above ``v`` (0 to 256) inverted."""
    return torch.where(x * 255 >= v.view(-1, 1, 1, 1), 1 - x, x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Each image resampled through its own 2x3 matrix (output coordinates to input, about the centre, in
    [-1, 1]); nearest neighbour, black outside."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _matrices(v: torch.Tensor, kind: str, h: int, w: int) -> torch.Tensor:
    """The (n, 2, 3) sampling matrices of one geometric operation at magnitudes ``v``."""
    theta = torch.zeros(len(v), 2, 3, dtype=torch.float32, device=v.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if kind == "rotate":  # degrees; the aspect ratio kept for a non-square image
        a = v * (math.pi / 180)
        theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin() * h / w
        theta[:, 1, 0], theta[:, 1, 1] = a.sin() * w / h, a.cos()
    elif kind == "shear_x":
        theta[:, 0, 1] = v * h / w
    elif kind == "shear_y":
        theta[:, 1, 0] = v * w / h
    elif kind == "translate_x":  # a fraction of the width
        theta[:, 0, 2] = 2 * v
    elif kind == "translate_y":
        theta[:, 1, 2] = 2 * v
    return theta


GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@dataclass(frozen=True)
class Operation:
    name: str
    low: float  # the magnitude's range
    high: float
    apply: Op | None  # None: geometric (its matrix from :func:`_matrices`)


# FixMatch's pool with the USB benchmark's ranges (microsoft/Semi-supervised-learning, randaugment.py)
POOL: tuple[Operation, ...] = (
    Operation("autocontrast", 0, 1, autocontrast),
    Operation("brightness", 0.05, 0.95, brightness),
    Operation("color", 0.05, 0.95, color),
    Operation("contrast", 0.05, 0.95, contrast),
    Operation("equalize", 0, 1, equalize),
    Operation("identity", 0, 1, identity),
    Operation("posterize", 4, 8, posterize),
    Operation("rotate", -30, 30, None),
    Operation("sharpness", 0.05, 0.95, sharpness),
    Operation("shear_x", -0.3, 0.3, None),
    Operation("shear_y", -0.3, 0.3, None),
    Operation("solarize", 0, 256, solarize),
    Operation("translate_x", -0.3, 0.3, None),
    Operation("translate_y", -0.3, 0.3, None),
)


@dataclass(frozen=True)
class StrongAugment:
    """The strong view's settings: operations per image and Cutout's largest side (a fraction of the image's)."""

    ops: int = 3
    cutout: float = 0.5


def random_cutout(x: torch.Tensor, largest: float, generator: torch.Generator | None) -> torch.Tensor:
    """In each image a square of side drawn uniformly up to ``largest`` of the shorter side, around a uniformly
    drawn centre (cut at the borders), set to grey (0.5), as the USB benchmark's strong view ends."""
    if largest <= 0:
        return x
    b, _, h, w = x.shape
    side = (torch.rand(b, 1, generator=generator, device=x.device) * largest * min(h, w)).round().long()
    cy = torch.randint(0, h, (b, 1), generator=generator, device=x.device) - side // 2
    cx = torch.randint(0, w, (b, 1), generator=generator, device=x.device) - side // 2
    rows, cols = torch.arange(h, device=x.device)[None], torch.arange(w, device=x.device)[None]
    inside = ((rows >= cy) & (rows < cy + side))[:, :, None] & ((cols >= cx) & (cols < cx + side))[:, None, :]
    return torch.where(inside[:, None], torch.full_like(x, 0.5), x)


def strong_augment(x: torch.Tensor, cfg: StrongAugment, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` (B, C, H, W) in [0, 1]: each image through ``cfg.ops`` operations of :data:`POOL` drawn for it (with
    replacement, each at a random magnitude in its range), then Cutout; channels_last like the input."""
    b, _, h, w = x.shape
    x = x.clone(memory_format=torch.contiguous_format)  # the groups below write into it: never the caller's
    chosen = torch.randint(0, len(POOL), (b, cfg.ops), generator=generator, device=x.device)
    u = torch.rand(b, cfg.ops, generator=generator, device=x.device)
    low = torch.tensor([op.low for op in POOL], device=x.device)
    high = torch.tensor([op.high for op in POOL], device=x.device)
    magnitude = low[chosen] + (high - low)[chosen] * u
    # which images each operation of each slot takes, found before any work
    groups = [[(chosen[:, s] == i).nonzero().flatten() for i in range(len(POOL))] for s in range(cfg.ops)]
    for s in range(cfg.ops):
        theta, moved = [], []
        for i, op in enumerate(POOL):
            idx = groups[s][i]
            if idx.numel() == 0 or op.name == "identity":
                continue
            if op.apply is None:
                theta.append(_matrices(magnitude[idx, s], op.name, h, w))
                moved.append(idx)
            else:
                x[idx] = op.apply(x[idx], magnitude[idx, s]).to(x.dtype)
        if moved:
            idx = torch.cat(moved)
            x[idx] = _affine(x[idx], torch.cat(theta))
    return random_cutout(x, cfg.cutout, generator).contiguous(memory_format=torch.channels_last)
