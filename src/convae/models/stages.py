"""The lecture's architecture (``stages``): stride-2 conv stages, an FC latent, a mirrored decoder.

Read top to bottom: blocks, encoder, decoder, registration. Shapes are given for the ``seed``
preset (3x32x32 input, widths 64-128-128, latent 1024); the seed model's state dict keeps the
lecture's layer indices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.errors import ConvaeError
from .registry import OUTPUT_ACTIVATIONS, Architecture, BaseModelConfig, Code, EncoderBase, register_architecture
from .upsample_conv import can_fuse, fusion_pays, upsample_conv, upsampler


def stage_sizes(cfg: BaseModelConfig) -> list[tuple[int, int]]:
    """Spatial size at every depth, input first: 32 -> 16 -> 8 -> 4, or 28 -> 14 -> 7 -> 4."""
    sizes = [(cfg.height, cfg.width)]
    for _ in cfg.channels:
        h, w = sizes[-1]
        # 3x3 conv, stride 2, padding 1 (and a ceil-mode 2x2 max-pool) give ceil(n / 2)
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def flat_dim(cfg: BaseModelConfig) -> int:
    """Neurons in the last conv volume: 128 * 4 * 4 = 2048 for the seed model."""
    h, w = stage_sizes(cfg)[-1]
    return cfg.channels[-1] * h * w


# ----------------------------------------------------------------------------- blocks


def _act(cfg: BaseModelConfig) -> nn.Module:
    return nn.LeakyReLU(cfg.negative_slope)


def _conv_block(cfg: BaseModelConfig, c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    """3x3 conv (no bias before a norm), norm, LeakyReLU. The seed model has no norm, so its
    state dict keeps the lecture's layer indices."""
    norm = {"none": [], "batch": [nn.BatchNorm2d(c_out)], "group": [nn.GroupNorm(math.gcd(c_out, 8), c_out)]}
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=cfg.norm == "none"), *norm[cfg.norm], _act(cfg)]


def _extra_convs(cfg: BaseModelConfig, channels: int) -> list[nn.Module]:  # convs_per_stage - 1 stride-1 blocks
    return [m for _ in range(cfg.convs_per_stage - 1) for m in _conv_block(cfg, channels, channels)]


# ----------------------------------------------------------------------------- encoder


class Encoder(EncoderBase):
    """Image -> latent vector. x: (B, 3, 32, 32) -> (B, 1024)."""

    def __init__(self, cfg: BaseModelConfig) -> None:
        super().__init__()
        self.config = cfg
        pool = cfg.upsample == "unpool"  # max-unpooling needs the indices of a max-pool encoder
        layers: list[nn.Module] = []
        stage_ends: list[int] = []  # index of each stage's last layer (its output is pooled)
        c_in = cfg.in_channels
        for c in cfg.channels:
            if pool:
                layers += [
                    *_conv_block(cfg, c_in, c),
                    *_extra_convs(cfg, c),
                    nn.MaxPool2d(2, ceil_mode=True, return_indices=True),
                ]
            else:
                layers += [*_conv_block(cfg, c_in, c, stride=2), *_extra_convs(cfg, c)]
            stage_ends.append(len(layers) - 1)
            c_in = c
        # (B, 3, 32, 32) -> (B, 64, 16, 16) -> (B, 128, 8, 8) -> (B, 128, 4, 4)
        self.conv = nn.Sequential(*layers)
        self._stage_ends = set(stage_ends)
        # (B, 2048) -> (B, 1024)
        self.fc = nn.Sequential(nn.Linear(flat_dim(cfg), cfg.latent_dim), _act(cfg))

    @property
    def first_conv(self) -> nn.Conv2d:
        """The layer whose kernels the lecture visualises."""
        return self.conv[0]

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The last conv volume, every stage's output, and the max-pool indices (unpool variant)."""
        indices, outputs = [], []
        for i, layer in enumerate(self.conv):
            if isinstance(layer, nn.MaxPool2d):
                x, idx = layer(x)
                indices.append(idx)
            else:
                x = layer(x)
            if i in self._stage_ends:
                outputs.append(x)
        return x, outputs, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.code(x)[0]

    def code(self, x: torch.Tensor) -> Code:
        """The latent and, for the unpool decoder, the max-pool indices."""
        x, _, indices = self.stages(x)
        z = self.fc(x.flatten(1))  # flatten in NCHW order, as the lecture's view(-1, 2048)
        return z, (indices if self.config.upsample == "unpool" else None)

    def kernels(self) -> torch.Tensor:
        return self.first_conv.weight.detach().clone()

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Every stage's output average-pooled to 2x2 and concatenated: (B, 4 * sum(channels)).

        The way conv autoencoders are probed in the literature: the FC latent of a small
        network discards most of the spatial detail that a linear classifier can use.
        """
        _, outputs, _ = self.stages(x)
        return torch.cat([F.adaptive_avg_pool2d(o, 2).flatten(1) for o in outputs], 1)


# ----------------------------------------------------------------------------- decoder


class Decoder(nn.Module):
    """Latent vector -> image of exactly the encoder's input size. (B, 1024) -> (B, 3, 32, 32)."""

    def __init__(self, cfg: BaseModelConfig) -> None:
        super().__init__()
        self.config = cfg
        sizes = stage_sizes(cfg)
        w = cfg.channels
        n = len(w)
        # (B, 1024) -> (B, 2048), reshaped to (B, 128, 4, 4)
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, flat_dim(cfg)), _act(cfg))
        self._volume = (w[-1], *sizes[-1])
        self._targets = [sizes[n - 1 - k] for k in range(n)]  # output size of each stage
        layers: list[nn.Module] = []
        for k in range(n):
            depth = n - 1 - k  # the encoder stage this decoder stage mirrors
            c_in, c_out = w[depth], w[max(depth - 1, 0)]
            if cfg.upsample == "unpool":
                # unpool first: the indices belong to the encoder's w[depth]-channel volume
                layers += [nn.MaxUnpool2d(2), *_extra_convs(cfg, c_in), *_conv_block(cfg, c_in, c_out)]
            else:
                layers += [
                    *_extra_convs(cfg, c_in),
                    *_conv_block(cfg, c_in, c_out),
                    upsampler(cfg.upsample, c_out, sizes[depth + 1], sizes[depth]),
                ]
        # (B, 128, 4, 4) -> (B, 128, 8, 8) -> (B, 64, 16, 16) -> (B, 64, 32, 32) -> (B, 3, 32, 32)
        layers.append(nn.Conv2d(w[0], cfg.in_channels, kernel_size=3, stride=1, padding=1))
        if cfg.output_activation != "none":  # no identity layer: the module list stays the lecture's
            layers.append(OUTPUT_ACTIVATIONS[cfg.output_activation]())
        self.conv = nn.Sequential(*layers)
        # Upsample -> Conv2d pairs that ops.upsample_conv computes on CPU (same function and
        # parameters), where fusing was measured to pay: the seed model's 64 -> 3 layer.
        self.fuse_upsample = True
        self._fusable = {
            i for i in range(len(layers) - 1) if can_fuse(layers[i], layers[i + 1]) and fusion_pays(layers[i + 1])
        }

    def _fused(self, x: torch.Tensor) -> bool:
        # tracers and exporters see the plain layers; other devices are not measured
        return (
            self.fuse_upsample
            and x.device.type == "cpu"
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )

    def forward(self, z: torch.Tensor, indices: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.fc(z).view(-1, *self._volume)
        stage = 0
        fused = self._fused(x)
        skip = False
        for i, layer in enumerate(self.conv):
            if skip:  # the conv already applied with the upsample before it
                skip = False
            elif fused and i in self._fusable:
                conv = self.conv[i + 1]
                x = upsample_conv(x, conv.weight, conv.bias, layer.mode)
                skip = True
            elif isinstance(layer, nn.MaxUnpool2d):
                assert indices is not None, "unpool decoder needs the encoder's pooling indices"
                x = layer(x, indices[-1 - stage], output_size=self._targets[stage])
                stage += 1
            else:
                x = layer(x)
        return x


def _check(cfg: BaseModelConfig, where: str) -> None:
    # every stage halves the size; below 2**stages the deepest feature map would be padding only
    smallest = 2 ** len(cfg.channels)
    if cfg.height < smallest or cfg.width < smallest:
        raise ConvaeError(
            f"{where}input size {cfg.height}x{cfg.width} is too small for {len(cfg.channels)} encoder "
            f"stages: height and width must be >= {smallest}"
        )


register_architecture(Architecture("stages", Encoder, Decoder, feature_dim=lambda cfg: cfg.latent_dim, check=_check))
