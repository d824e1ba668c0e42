"""Pretraining objectives: how the input is corrupted, what the target is, which pixels count.

Every objective is one class registered by name: ``objective.loss(model, x, generator)`` on a
batch ``x`` of clean images in [0, 1] (no labels), and as a criterion of the training loop
``objective(model, batch, generator)``. It works with every architecture, size, channel count and
upsample mode because it only calls the autoencoder's ``forward``; an objective that only
trains some architectures names them (``archs``).

- ``reconstruct``: the lecture's MSE on the whole image (the seed preset).
- ``denoise``: Gaussian noise and/or pixels dropped from the input; the target is the clean image.
- ``masked``: random square patches hidden; the loss counts the hidden pixels only, optionally
  against per-patch normalised targets (as MAE's ``norm_pix_loss``).
- ``sparse``: winner-take-all on the code (Makhzani & Frey): each image keeps its k largest
  units, and each unit keeps only its largest activations over the batch (lifetime sparsity).
- ``patches`` (registered by :mod:`convae.patchnet`, the only architecture it trains): random
  crops of the filters' size, lifetime sparsity over all crops, the loss on normalised patches.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.knobs import Choice, Flag, Int, Num, knob
from ..utils.records import Batch

OBJECTIVES: dict[str, type[Objective]] = {}


def objective_names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


@dataclass(frozen=True)
class ObjectiveKnobs:
    """The objective and its knobs as the run config holds them; only the chosen objective's are used."""

    objective: str = knob(
        "reconstruct",
        Choice(objective_names),
        "pretraining objective (default reconstruct, the lecture's MSE)",
        group="pretrain",
    )
    noise_std: float = knob(
        0.1, Num(0), "denoise: Gaussian noise std on [0, 1] pixels (default 0.1)", group="pretrain", metavar="S"
    )
    drop_prob: float = knob(
        0.0, Num(0, hi=1), "denoise: probability a pixel is zeroed (default 0)", group="pretrain", metavar="P"
    )
    mask_ratio: float = knob(
        0.6,
        Num(0, lo_open=True, hi=1),
        "masked: fraction of patches hidden (default 0.6)",
        group="pretrain",
        metavar="R",
    )
    patch_size: int = knob(4, Int(1), "masked: patch side in pixels (default 4)", group="pretrain", metavar="P")
    norm_targets: bool = knob(
        False, Flag(), "masked: per-patch normalised targets (use with --output-activation none)", group="pretrain"
    )
    sparse_k: int = knob(
        0, Int(0), "sparse: code units kept per image (default 0 = all)", group="pretrain", metavar="K"
    )
    lifetime_rate: float = knob(
        0.05,
        Num(0, hi=1),
        "sparse, patches: fraction of the batch each unit stays active for (default 0.05)",
        group="pretrain",
        metavar="R",
    )
    patches_per_image: int = knob(
        16, Int(1, 4096), "patches: random crops per image per step (default 16)", group="pretrain", metavar="N"
    )


@dataclass(frozen=True)
class ObjectiveConfig(ObjectiveKnobs):
    """What an objective is built from: the knobs, and the patch crops' side (the encoder's kernel size)."""

    crop_size: int = 6


def masked_mse(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the pixels where ``weight`` is 1 (every pixel when None)."""
    err = (out.float() - target.float()).pow(2)
    if weight is None:
        return err.mean()
    weight = weight.expand_as(err).float()
    return (err * weight).sum() / weight.sum().clamp(min=1)


def patch_mask(
    shape: torch.Size, patch: int, ratio: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
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


def _patch_blocks(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``x`` padded to whole patches as (B, C, gh, patch, gw, patch) blocks."""
    b, c, h, w = x.shape
    ph, pw = -(-h // patch) * patch, -(-w // patch) * patch
    xp = F.pad(x.float(), (0, pw - w, 0, ph - h), mode="replicate")
    return xp.view(b, c, ph // patch, patch, pw // patch, patch)


def _patch_stats(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and std over all its channels together."""
    mean = blocks.mean(dim=(1, 3, 5), keepdim=True)
    var = blocks.var(dim=(1, 3, 5), keepdim=True, unbiased=False)
    return mean, (var + 1e-6).sqrt()


def _unblock(blocks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, c, gh, p, gw, _ = blocks.shape
    return blocks.reshape(b, c, gh * p, gw * p)[:, :, :h, :w]


def normalise_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Each patch of ``x`` (all its channels together) shifted to mean 0 and scaled to std 1."""
    blocks = _patch_blocks(x, patch)
    mean, std = _patch_stats(blocks)
    return _unblock((blocks - mean) / std, *x.shape[2:])


def denormalise_patches(y: torch.Tensor, x: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of :func:`normalise_patches` with the statistics of ``x``: a prediction of
    normalised patches ``y`` shown as pixels (MAE draws its predictions the same way)."""
    mean, std = _patch_stats(_patch_blocks(x, patch))
    return _unblock(_patch_blocks(y, patch) * std + mean, *x.shape[2:])


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


def takes_mask(model: nn.Module) -> bool:
    """Whether ``model`` (an autoencoder, or any module; under DDP or torch.compile too) is told which
    pixels were hidden: convae's autoencoder is (its encoder decides what to do with it)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return _forward_takes_mask(type(inner))


@functools.cache
def _forward_takes_mask(cls: type) -> bool:  # once per class, not once per step
    return "mask" in inspect.signature(cls.forward).parameters


class Objective:
    """A pretraining objective: ``loss(model, x, generator)``, and the criterion the loop calls."""

    name: ClassVar[str] = ""
    random: ClassVar[bool] = False  # draws from the step's generator
    archs: ClassVar[tuple[str, ...] | None] = None  # the only architectures it trains (None: any)
    hides: ClassVar[bool] = False  # hides parts of the input and tells the encoder where (``masked_code``)

    def __init__(self, cfg: ObjectiveConfig) -> None:
        self.cfg = cfg

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.loss(model, batch.x, generator)

    def summed(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The loss summed over the images of ``x`` (float64), for a mean over an evaluation set."""
        return self.loss(model, x, generator).detach().double() * x.shape[0]

    def examples(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The rows of the reconstructions figure under ``x``: what the network is given (when it is
        not ``x``) and what it makes of it, named, as images comparable with ``x``."""
        return {"reconstruction": model(x)}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: ``cls.name`` becomes a choice of ``--objective``."""
    OBJECTIVES[cls.name] = cls
    return cls


def make_objective(cfg: ObjectiveConfig) -> Objective:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}")
    return OBJECTIVES[cfg.objective](cfg)


@register_objective
class Reconstruct(Objective):
    """The lecture's MSE on the whole image."""

    name = "reconstruct"

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return F.mse_loss(model(x).float(), x)  # the lecture's loss, exactly

    def summed(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return F.mse_loss(model(x).float(), x, reduction="sum").double() / x[0].numel()


@register_objective
class Denoise(Objective):
    """Gaussian noise and/or dropped pixels on the input; the target is the clean image."""

    name, random = "denoise", True

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, None]:
        """The network's input and the loss weight (None: every pixel counts)."""
        c, noisy = self.cfg, x
        if c.noise_std > 0:
            noisy = noisy + c.noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if c.drop_prob > 0:
            keep = torch.rand((x.shape[0], 1, *x.shape[2:]), generator=generator, device=x.device) >= c.drop_prob
            noisy = noisy * keep
        return noisy.contiguous(memory_format=torch.channels_last), None

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return masked_mse(model(self.corrupt(x, generator)[0]), x, None)

    def examples(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        inp = self.corrupt(x, generator)[0]
        return {"corrupted input": inp, "reconstruction": model(inp)}


@register_objective
class Masked(Objective):
    """Random square patches hidden; the loss counts the hidden pixels only."""

    name, random, hides = "masked", True, True

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's input and the loss weight (1 on hidden pixels)."""
        mask = patch_mask(x.shape, self.cfg.patch_size, self.cfg.mask_ratio, generator, x.device).to(x.dtype)
        return (x * (1 - mask)).contiguous(memory_format=torch.channels_last), mask

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        inp, weight = self.corrupt(x, generator)
        target = normalise_patches(x, self.cfg.patch_size) if self.cfg.norm_targets else x
        return masked_mse(self.predict(model, inp, weight), target, weight)

    @staticmethod
    def predict(model: nn.Module, inp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The network's output for the masked input, told which pixels are hidden when it takes that."""
        return model(inp, mask=mask) if takes_mask(model) else model(inp)

    def examples(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        # the network as it is trained: told which patches are hidden, judged on those only;
        # the seen pixels are shown as they are (the loss never asked the network for them)
        inp, mask = self.corrupt(x, generator)
        out = self.predict(model, inp, mask).float()
        name = "hidden patches predicted"
        if self.cfg.norm_targets:  # the network predicts each patch's shape, not its mean and contrast
            out, name = denormalise_patches(out, x, self.cfg.patch_size), f"{name} (with their true mean and std)"
        return {"masked input": inp, name: x * (1 - mask) + out * mask}


@register_objective
class Sparse(Objective):
    """Winner-take-all on the code: each image keeps its k largest units, each unit its largest
    activations over the batch."""

    name = "sparse"

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.cfg
        return masked_mse(model(x, code_fn=lambda z: winner_take_all(z, c.sparse_k, c.lifetime_rate)), x, None)

    def examples(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        # each image's k winners, without the lifetime selection: that one is over a training batch,
        # and a winner-take-all autoencoder is used without it once trained (Makhzani & Frey 2015)
        k = self.cfg.sparse_k
        return {"reconstruction": model(x, code_fn=lambda z: winner_take_all(z, k, 0.0))}
