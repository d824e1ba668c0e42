"""Pretraining objectives: how the input is corrupted, what the target is, which pixels count.

Every objective is a criterion ``objective(model, x, y, generator) -> loss`` on a batch ``x``
of clean images in [0, 1] (``y`` is ignored: no labels); it works with every architecture,
size, channel count and upsample mode because it only calls the autoencoder's ``forward``.

- ``reconstruct``: the lecture's MSE on the whole image (the seed preset).
- ``denoise``: Gaussian noise and/or pixels dropped from the input; the target is the clean image.
- ``masked``: random square patches hidden; the loss counts the hidden pixels only, optionally
  against per-patch normalised targets (as MAE's ``norm_pix_loss``).
- ``sparse``: winner-take-all on the code (Makhzani & Frey): each image keeps its k largest
  units, and each unit keeps only its largest activations over the batch (lifetime sparsity).
- ``patches``: the ``patch`` architecture's objective (:mod:`convae.patchnet`): random crops of
  the filters' size, each unit kept for its largest responses over all crops of the batch
  (lifetime sparsity), the loss measured on contrast-normalised patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .patchnet import patch_stats, random_patches

OBJECTIVES = ("reconstruct", "denoise", "masked", "sparse", "patches")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The objective's knobs; only those of the chosen objective are used."""

    name: str = "reconstruct"
    noise_std: float = 0.1  # denoise: Gaussian noise, in units of the [0, 1] pixel range
    drop_prob: float = 0.0  # denoise: probability that a pixel (all its channels) is zeroed
    mask_ratio: float = 0.6  # masked: fraction of patches hidden
    patch_size: int = 4  # masked: patch side in pixels
    norm_targets: bool = False  # masked: each patch's target normalised to mean 0, std 1
    sparse_k: int = 0  # sparse: units kept per image (0 = no per-image sparsity)
    lifetime_rate: float = 0.05  # sparse, patches: fraction of the batch each unit stays active for
    patches_per_image: int = 16  # patches: random crops taken from every image of a batch
    crop_size: int = 6  # patches: the crops' side, the patch encoder's kernel size


def masked_mse(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the pixels where ``weight`` is 1 (every pixel when None)."""
    err = (out.float() - target.float()).pow(2)
    if weight is None:
        return err.mean()
    weight = weight.expand_as(err).float()
    return (err * weight).sum() / weight.sum().clamp(min=1)


def patch_mask(shape: torch.Size, patch: int, ratio: float, generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
    """(B, 1, H, W) float mask, 1 on hidden pixels: round(ratio * patches) whole patches per image.

    Images whose size is not a multiple of ``patch`` get partial patches at the border.
    """
    b, _, h, w = shape
    gh, gw = -(-h // patch), -(-w // patch)
    n = gh * gw
    hidden = min(max(round(ratio * n), 1), n - 1) if n > 1 else n
    scores = torch.rand(b, n, generator=generator, device=device)
    ranks = scores.argsort(1).argsort(1)  # a random permutation per image
    grid = (ranks < hidden).float().view(b, 1, gh, gw)
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]


def normalise_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Each patch of ``x`` (all its channels together) shifted to mean 0 and scaled to std 1."""
    b, c, h, w = x.shape
    ph, pw = -(-h // patch) * patch, -(-w // patch) * patch
    xp = F.pad(x.float(), (0, pw - w, 0, ph - h), mode="replicate")
    blocks = xp.view(b, c, ph // patch, patch, pw // patch, patch)
    mean = blocks.mean(dim=(1, 3, 5), keepdim=True)
    var = blocks.var(dim=(1, 3, 5), keepdim=True, unbiased=False)
    out = (blocks - mean) / (var + 1e-6).sqrt()
    return out.view(b, c, ph, pw)[:, :, :h, :w]


def winner_take_all(z: torch.Tensor, k: int, lifetime_rate: float) -> torch.Tensor:
    """Keep each image's ``k`` largest units (k = 0: all), then, for every unit, only the
    ``ceil(lifetime_rate * batch)`` largest of the survivors over the batch; zero the rest.

    Gradients flow through the winners only.
    """
    if k and k < z.shape[1]:
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(k, dim=1).indices, True)
        z = z * keep
    if 0 < lifetime_rate < 1:
        winners = max(1, math.ceil(lifetime_rate * z.shape[0]))
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(0, z.topk(winners, dim=0).indices, True)
        z = z * keep
    return z


class Objective:
    """``objective(model, x, y, generator)`` -> scalar loss; ``corrupt`` and ``target`` say how."""

    def __init__(self, cfg: ObjectiveConfig) -> None:
        if cfg.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {cfg.name!r}")
        self.cfg = cfg
        self.random = cfg.name in ("denoise", "masked", "patches")  # draws from the step's generator

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's input and the loss weight (1 on pixels that count; None = all)."""
        c = self.cfg
        if c.name == "denoise":
            noisy = x
            if c.noise_std > 0:
                noisy = noisy + c.noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if c.drop_prob > 0:
                keep = torch.rand((x.shape[0], 1, *x.shape[2:]), generator=generator, device=x.device) >= c.drop_prob
                noisy = noisy * keep
            return noisy.contiguous(memory_format=torch.channels_last), None
        if c.name == "masked":
            mask = patch_mask(x.shape, c.patch_size, c.mask_ratio, generator, x.device).to(x.dtype)
            return (x * (1 - mask)).contiguous(memory_format=torch.channels_last), mask
        return x, None

    def patch_loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """MSE between random crops and their reconstructions, both contrast-normalised by the
        crop's own mean and deviation (a flat patch counts as much as an edge)."""
        c = self.cfg
        crops = random_patches(x, c.crop_size, c.patches_per_image, generator)  # (N, C, k, k)
        code_fn = lambda h: winner_take_all(h.flatten(1), 0, c.lifetime_rate).view_as(h)  # noqa: E731
        out = model(crops, code_fn=code_fn)  # through forward: DDP sees the step
        mean, std = patch_stats(crops.float(), c.crop_size)  # (N, 1, 1, 1): one patch per crop
        return F.mse_loss((out.float() - mean) / std, (crops.float() - mean) / std)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.name == "masked" and self.cfg.norm_targets:
            return normalise_patches(x, self.cfg.patch_size)
        return x

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.cfg
        if c.name == "reconstruct":
            return F.mse_loss(model(x).float(), x)  # the lecture's loss, exactly
        if c.name == "patches":
            return self.patch_loss(model, x, generator)
        inp, weight = self.corrupt(x, generator)
        if c.name == "sparse":
            out = model(inp, code_fn=lambda z: winner_take_all(z, c.sparse_k, c.lifetime_rate))
        else:
            out = model(inp)
        return masked_mse(out, self.target(x), weight)
