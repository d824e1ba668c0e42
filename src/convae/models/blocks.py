"""The ``blocks`` architecture: a small conv net that classifies well, and its decoder.

The design of the fast CIFAR-10 baselines (Page's ResNet-style DAWNBench net, Jordan's
airbench 2024), made an autoencoder's encoder:

- a fitted, frozen **whitening stem**: a 2x2 convolution whose filters are the eigenvectors of
  the training images' 2x2 patch covariance, scaled to unit variance (both signs), so the first
  learned layer sees decorrelated pixels; fitted before pretraining (or before training from
  scratch: it is a statistic of the images, not learned);
- ``len(channels)`` **blocks**, each 3x3 conv -> 2x2 max-pool -> batch norm -> GELU, then
  ``convs_per_stage - 1`` more 3x3 conv -> batch norm -> GELU;
- **global max pooling** of the last block: the head reads ``channels[-1]`` features.

Shapes for the ``blocks`` preset (3x32x32, widths 64-256-256, 2 convs per block):
(B, 3, 32, 32) -> stem (B, 24, 31, 31) -> (B, 64, 15, 15) -> (B, 256, 7, 7) -> (B, 256, 3, 3)
-> (B, 256). The decoder mirrors the blocks (upsample, 3x3 conv, batch norm, GELU) back to the
input's size. Masked pretraining (:class:`~convae.objectives.Masked`) passes its mask to
:meth:`BlocksEncoder.masked_code`, which zeroes the hidden positions after every block, as a
sparse convolution would (SparK, ConvNeXt V2): hidden patches neither leak into visible ones
nor shift the features' statistics through the zeros at their borders. With ``skips`` (SparK's
hierarchical decoder) the decoder also reads every shallower block's map, hidden positions filled
with a learned token per level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.errors import ConvaeError
from ..utils.knobs import Flag, knob
from .objectives import OBJECTIVES
from .registry import OUTPUT_ACTIVATIONS, Architecture, BaseModelConfig, Code, EncoderBase, register_architecture

STEM = 2  # the whitening stem's kernel side
# added to the patch covariance's eigenvalues, on [0, 1] pixels (airbench's 5e-4 on standardised
# pixels of std ~0.25): it keeps the whitening from amplifying the last eigenvectors' noise
WHITENING_EPS = 3e-5
WHITENING_IMAGES = 5000  # the sample the stem is fitted on


@dataclass(frozen=True)
class BlocksKnobs:
    """The blocks network's own settings (flags, saved configs and checkpoints hold them as any knob)."""

    skips: bool = knob(
        False,
        Flag(),
        "blocks: the decoder also reads every block's map, hidden positions filled "
        "with a learned mask token under --objective masked (SparK's hierarchical decoder)",
        group="model",
    )


def block_sizes(cfg: BaseModelConfig) -> list[tuple[int, int]]:
    """Spatial size after the stem and after every block: 32 -> 31 -> 15 -> 7 -> 3."""
    sizes = [(cfg.height - STEM + 1, cfg.width - STEM + 1)]
    for _ in cfg.channels:
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2))
    return sizes


def stem_width(cfg: BaseModelConfig) -> int:
    return 2 * cfg.in_channels * STEM * STEM  # every eigenvector with both signs: 24 for RGB


# ----------------------------------------------------------------------------- blocks


def _conv_bn(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
    """3x3 conv (no bias: the norm has one), [2x2 max-pool], batch norm, GELU."""
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        *([nn.MaxPool2d(2)] if pool else []),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
    ]


class Block(nn.Sequential):
    """(B, c_in, H, W) -> (B, c_out, H // 2, W // 2)."""

    def __init__(self, c_in: int, c_out: int, convs: int) -> None:
        super().__init__(
            *_conv_bn(c_in, c_out, pool=True),
            *[m for _ in range(convs - 1) for m in _conv_bn(c_out, c_out, pool=False)],
        )


# ----------------------------------------------------------------------------- encoder


class BlocksEncoder(EncoderBase):
    """Image -> globally max-pooled features. x: (B, 3, 32, 32) -> (B, 256, 3, 3) -> (B, 256)."""

    def __init__(self, cfg: BaseModelConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.in_channels * STEM * STEM
        # unfitted, the stem passes every pixel of the patch through with both signs (no random
        # numbers drawn: an unfitted network's other weights are the same with or without it)
        eye = torch.eye(d, device="cpu").view(d, cfg.in_channels, STEM, STEM)
        self.register_buffer("stem_weight", torch.cat([eye, -eye]))
        self.register_buffer("stem_bias", torch.zeros(2 * d, device="cpu"))
        widths = [stem_width(cfg), *cfg.channels]
        self.blocks = nn.ModuleList(Block(a, b, cfg.convs_per_stage) for a, b in zip(widths, widths[1:]))

    @property
    def fit_images(self) -> int:  # type: ignore[override]
        return WHITENING_IMAGES

    @torch.no_grad()
    def fit_to_data(self, x: torch.Tensor, generator: torch.Generator) -> str | None:
        """The stem's filters from the 2x2 patches of ``x`` (float images in [0, 1]), ZCA-free:
        eigenvectors scaled by 1/sqrt(eigenvalue + eps), centred on the patches' mean."""
        c = self.config.in_channels
        p = F.unfold(x.float(), STEM).transpose(1, 2).reshape(-1, c * STEM * STEM).double()  # (N, C*4)
        mean = p.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov((p - mean).T))
        w = (evecs / (evals.clamp(min=0) + WHITENING_EPS).sqrt()).T  # rows: scaled eigenvectors
        w = torch.cat([w, -w]).float()
        self.stem_weight.copy_(w.view_as(self.stem_weight))
        self.stem_bias.copy_(-(w @ mean.float()))
        return f"whitening stem fitted on the 2x2 patches of {len(x)} training images"

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 8C, H - 1, W - 1): whitened patches, rectified as the first layer's input."""
        w, b = self.stem_weight.to(x.dtype), self.stem_bias.to(x.dtype)
        return F.gelu(F.conv2d(x, w, b))

    def levels(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Every block's map, shallow first, each with its visible positions (B, 1, h, w), 1 = seen
        (None: no mask). ``mask`` (B, 1, H, W), 1 on hidden pixels, zeroes the hidden positions at every depth."""
        keep = None if mask is None else 1 - mask.float()
        h = self.stem(x)
        h, out = _masked(h, _visible(keep, h)), []
        for block in self.blocks:
            h = block(h)
            seen = _visible(keep, h)
            h = _masked(h, seen)
            out.append((h, seen))
        return out

    def maps(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's map, (B, channels[-1], h, w), hidden positions zeroed under ``mask``."""
        return self.levels(x, mask)[-1][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.maps(x), dim=(2, 3))

    def code(self, x: torch.Tensor) -> Code:
        return self._code(self.levels(x))

    def masked_code(self, x: torch.Tensor, mask: torch.Tensor) -> Code:
        return self._code(self.levels(x, mask))

    def _code(self, levels: list) -> Code:
        """The last map; with ``skips`` every level for the decoder too."""
        return levels[-1][0], (levels if self.config.skips else None)

    def kernels(self) -> torch.Tensor:
        """The stem's filters, (8C, C, 2, 2): what the network sees of a patch."""
        return self.stem_weight.detach().clone()


def _visible(keep: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, h, w) of ``h``'s size: 1 where most of the pixels under a position are seen (None: all)."""
    return None if keep is None else (F.adaptive_avg_pool2d(keep, h.shape[2:]) > 0.5).to(h.dtype)


def _masked(h: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """``h`` with the hidden positions set to zero."""
    return h if seen is None else h * seen


# ----------------------------------------------------------------------------- decoder


class BlocksDecoder(nn.Module):
    """Last map -> image of the input's size. (B, 256, 3, 3) -> (B, 256, 7, 7) -> (B, 64, 15, 15)
    -> (B, 24, 31, 31) -> (B, 3, 32, 32): upsample to the encoder's size there, 3x3 conv, norm, GELU."""

    def __init__(self, cfg: BaseModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.sizes = block_sizes(cfg)[:-1][::-1]  # the sizes to upsample to, deepest first
        widths = [stem_width(cfg), *cfg.channels][::-1]
        self.stages = nn.ModuleList(nn.Sequential(*_conv_bn(a, b, pool=False)) for a, b in zip(widths, widths[1:]))
        self.out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)
        self.act = OUTPUT_ACTIVATIONS[cfg.output_activation]()
        if cfg.skips:
            # SparK's hierarchical decoder: every block's map, its hidden positions filled with a learned
            # token (the encoder zeroed them), is projected to the decoder's width at that size and added
            # before the stage; the zeros alone would tell the decoder nothing of what is missing
            levels = list(cfg.channels)[::-1]  # deepest first
            self.tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in levels)
            self.project = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(levels[1:], widths))

    def forward(self, h: torch.Tensor, context: list | None = None) -> torch.Tensor:
        """``h`` the last map; ``context`` (with ``skips``) every block's map and its seen positions, shallow first."""
        filled = []
        if context is not None:
            maps = [h] + [m for m, _ in context[-2::-1]]  # deepest first; h, not the context's: code_fn acted on it
            filled = [
                m if seen is None else m + (1 - seen) * t for m, (_, seen), t in zip(maps, context[::-1], self.tokens)
            ]
            h = filled[0]
        for i, (size, stage) in enumerate(zip(self.sizes, self.stages)):
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
            if i + 1 < len(filled):
                h = h + self.project[i](filled[i + 1])
            h = stage(h)
        h = F.interpolate(h, size=(self.config.height, self.config.width), mode="bilinear", align_corners=False)
        return self.act(self.out(h))


def _check(cfg: BaseModelConfig, where: str) -> None:
    h, w = block_sizes(cfg)[-1]
    if min(h, w) < 1:
        raise ConvaeError(
            f"{where}input size {cfg.height}x{cfg.width} is too small for {len(cfg.channels)} blocks "
            f"(each halves it after the 2x2 stem)",
            advice="use fewer --channels or larger images",
        )


PRESETS = {
    # The strong classifier (BENCHMARKS.md, "The blocks network"): the blocks net with the recipe of
    # the fast CIFAR-10 baselines (a warm-up then linear decay stepped per step, label smoothing, an
    # average of the weights, flip at test time, crop and flip), AdamW (steadier than SGD on short
    # CPU runs: measured), pretrained by masked-image modelling with the hierarchical decoder for 32
    # epochs (the decoder measured better, and 32 epochs better than 8 and 16 at every budget:
    # BENCHMARKS.md). --init scratch trains it from
    # random weights with the same recipe. Colour jitter 0.2 measured +1.6 to +3.1 points at 25, 100
    # and 400 labels per class (3 seeds each) and within a run's noise with every label.
    "blocks": {
        "arch": "blocks",
        "channels": (64, 256, 256),
        "convs_per_stage": 2,
        "output_activation": "none",
        "objective": "masked",
        "skips": True,
        "mask_ratio": 0.6,
        "patch_size": 4,
        "norm_targets": True,
        "pretrain_epochs": 32,
        "finetune_epochs": 18,
        "batch_size": 256,
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 0.05,
        "schedule": "triangle",
        "warmup": 0.2,
        "label_smoothing": 0.2,
        "ema": 0.99,
        "tta": True,
        "epoch_images": 10000,
        "augment": True,
        "crop_padding": 2,
        "jitter": 0.2,
        "probe_features": "pooled",
        "precision": "auto",
        "joint_noise": 0.15,
    },
}
# Few labels, many images: the blocks preset's network, pretraining and optimiser, then consistency training
# (FixMatch: +3.0 / +2.1 points over fine-tuning the same encoder at 25 / 100 labels per class, 3 seeds of 600
# steps; FlexMatch and FreeMatch let every prediction through at that length and were no better, one seed) on every
# training image beside the labelled ones, 64 labelled and 3 x 64 unlabelled images a step; an epoch is one pass
# over the unlabelled images (BENCHMARKS.md, "Consistency training").
PRESETS["few"] = {
    **PRESETS["blocks"],
    "joint": "fixmatch",
    "label_smoothing": 0.0,  # smoothing keeps every confidence below a threshold of 0.95 (BENCHMARKS.md)
    "batch_size": 64,
    "unlabelled_ratio": 3,
    "finetune_epochs": 10,
    "epoch_images": 0,
}


def _check_run(cfg: Any, where: str) -> None:
    """--skips with the run's objective: every block's map straight to the decoder would copy the input
    through the shallow ones unless they are masked."""
    if cfg.skips and not OBJECTIVES[cfg.objective].hides:
        raise ConvaeError(
            f"{where}--skips feeds the decoder every block's map: it pretrains --arch blocks with --objective "
            f"masked only, got {cfg.arch} with {cfg.objective}",
            advice="use --objective masked, or --no-skips",
        )


register_architecture(
    Architecture(
        "blocks",
        BlocksEncoder,
        BlocksDecoder,
        feature_dim=lambda cfg: cfg.channels[-1],
        check=_check,
        presets=PRESETS,
        knobs=BlocksKnobs,
        check_run=_check_run,
    )
)
