"""The lecture's convolutional autoencoder, and the classifier that reuses its encoder.

Read top to bottom: config, blocks, encoder, decoder, autoencoder, classifier.
Shapes are given for the ``seed`` preset (3x32x32 input, widths 64-128-128, latent 1024).

The encoder is one module class shared by construction: ``AutoEncoder.encoder`` and
``Classifier.encoder`` are both :class:`Encoder`, so transfer is a state-dict copy and
nothing else (timm's ``forward_features`` / ``reset_classifier`` interface).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .ops import can_fuse, fusion_pays, upsample_conv, upsampler
from .patchnet import PatchDecoder, PatchEncoder

ARCHS = ("stages", "patch")  # the lecture's family; one wide conv learned on patches (convae.patchnet)
UPSAMPLE_MODES = ("bilinear", "nearest", "transposed", "unpool")
NORMS = ("none", "batch", "group")
OUTPUT_ACTIVATIONS = ("relu", "sigmoid", "none")


# ----------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    in_channels: int = 3
    height: int = 32
    width: int = 32
    channels: tuple[int, ...] = (64, 128, 128)  # conv encoder widths; each stage halves H, W
    latent_dim: int = 1024
    upsample: str = "bilinear"  # one of UPSAMPLE_MODES
    negative_slope: float = 0.1
    num_classes: int = 10
    norm: str = "none"  # one of NORMS, after every conv of the encoder and decoder (not the output conv)
    convs_per_stage: int = 1  # extra stride-1 3x3 convs per stage, in the encoder and the decoder
    output_activation: str = "relu"  # the lecture's ReLU; "none" for targets outside [0, 1]
    arch: str = "stages"  # one of ARCHS; "patch" uses channels[0], kernel_size and threshold only
    kernel_size: int = 6  # patch: the filters' (and the patches') side
    threshold: float = 0.25  # patch: the features are relu(response - threshold)
    whiten: bool = False  # patch: ZCA-whiten the patches (fitted on the training data before pretraining)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)

    def stage_sizes(self) -> list[tuple[int, int]]:
        """Spatial size at every depth, input first: 32 -> 16 -> 8 -> 4, or 28 -> 14 -> 7 -> 4."""
        sizes = [(self.height, self.width)]
        for _ in self.channels:
            h, w = sizes[-1]
            # 3x3 conv, stride 2, padding 1 (and a ceil-mode 2x2 max-pool) give ceil(n / 2)
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        return sizes

    @property
    def flat_dim(self) -> int:
        """Neurons in the last conv volume: 128 * 4 * 4 = 2048 for the seed model."""
        h, w = self.stage_sizes()[-1]
        return self.channels[-1] * h * w

    @property
    def feature_dim(self) -> int:  # what the encoder returns: the FC latent, or 4 quadrants x K filters
        return 4 * self.channels[0] if self.arch == "patch" else self.latent_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)  # checkpoints from before norm/convs_per_stage get their defaults


# ----------------------------------------------------------------------------- blocks


def _act(cfg: ModelConfig) -> nn.Module:
    return nn.LeakyReLU(cfg.negative_slope)


def _conv_block(cfg: ModelConfig, c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    """3x3 conv (no bias before a norm), norm, LeakyReLU. The seed model has no norm, so its
    state dict keeps the lecture's layer indices."""
    norm = {"none": [], "batch": [nn.BatchNorm2d(c_out)], "group": [nn.GroupNorm(math.gcd(c_out, 8), c_out)]}
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=cfg.norm == "none"), *norm[cfg.norm], _act(cfg)]


def _extra_convs(cfg: ModelConfig, channels: int) -> list[nn.Module]:  # convs_per_stage - 1 stride-1 blocks
    return [m for _ in range(cfg.convs_per_stage - 1) for m in _conv_block(cfg, channels, channels)]


# ----------------------------------------------------------------------------- encoder


class Encoder(nn.Module):
    """Image -> latent vector. x: (B, 3, 32, 32) -> (B, 1024)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        pool = cfg.upsample == "unpool"  # max-unpooling needs the indices of a max-pool encoder
        layers: list[nn.Module] = []
        stage_ends: list[int] = []  # index of each stage's last layer (its output is pooled)
        c_in = cfg.in_channels
        for c in cfg.channels:
            if pool:
                layers += [*_conv_block(cfg, c_in, c), *_extra_convs(cfg, c),
                           nn.MaxPool2d(2, ceil_mode=True, return_indices=True)]
            else:
                layers += [*_conv_block(cfg, c_in, c, stride=2), *_extra_convs(cfg, c)]
            stage_ends.append(len(layers) - 1)
            c_in = c
        # (B, 3, 32, 32) -> (B, 64, 16, 16) -> (B, 128, 8, 8) -> (B, 128, 4, 4)
        self.conv = nn.Sequential(*layers)
        self._stage_ends = set(stage_ends)
        # (B, 2048) -> (B, 1024)
        self.fc = nn.Sequential(nn.Linear(cfg.flat_dim, cfg.latent_dim), _act(cfg))

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

    def forward(self, x: torch.Tensor, return_indices: bool = False):
        x, _, indices = self.stages(x)
        z = self.fc(x.flatten(1))  # flatten in NCHW order, as the lecture's view(-1, 2048)
        return (z, indices) if return_indices else z

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

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        sizes = cfg.stage_sizes()
        w = cfg.channels
        n = len(w)
        # (B, 1024) -> (B, 2048), reshaped to (B, 128, 4, 4)
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.flat_dim), _act(cfg))
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
                layers += [*_extra_convs(cfg, c_in), *_conv_block(cfg, c_in, c_out),
                           upsampler(cfg.upsample, c_out, sizes[depth + 1], sizes[depth])]
        # (B, 128, 4, 4) -> (B, 128, 8, 8) -> (B, 64, 16, 16) -> (B, 64, 32, 32) -> (B, 3, 32, 32)
        layers.append(nn.Conv2d(w[0], cfg.in_channels, kernel_size=3, stride=1, padding=1))
        layers += {"relu": [nn.ReLU()], "sigmoid": [nn.Sigmoid()], "none": []}[cfg.output_activation]
        self.conv = nn.Sequential(*layers)
        # Upsample -> Conv2d pairs that ops.upsample_conv computes on CPU (same function and
        # parameters), where fusing was measured to pay: the seed model's 64 -> 3 layer.
        self.fuse_upsample = True
        self._fusable = {i for i in range(len(layers) - 1)
                         if can_fuse(layers[i], layers[i + 1]) and fusion_pays(layers[i + 1])}

    def _fused(self, x: torch.Tensor) -> bool:
        # tracers and exporters see the plain layers; other devices are not measured
        return (self.fuse_upsample and x.device.type == "cpu" and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling())

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


# ----------------------------------------------------------------------------- autoencoder


class AutoEncoder(nn.Module):
    """Encoder + decoder, trained by reconstruction (MSE) without labels."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = make_encoder(cfg)
        self.decoder = PatchDecoder(cfg) if cfg.arch == "patch" else Decoder(cfg)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor, code_fn=None) -> torch.Tensor:
        """Reconstruction of ``x``; ``code_fn`` (latent -> latent), when given, acts on the code
        between encoder and decoder (the sparse objective's winner-take-all)."""
        if self.config.arch == "patch":
            h = self.encoder.code(x)
            return self.decoder(h if code_fn is None else code_fn(h), x)
        z, indices = self.encoder(x, return_indices=True)
        if code_fn is not None:
            z = code_fn(z)
        return self.decoder(z, indices if self.config.upsample == "unpool" else None)


# ----------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
    """The same encoder plus a linear head: (B, 3, 32, 32) -> (B, 1024) -> (B, num_classes)."""

    def __init__(self, cfg: ModelConfig, encoder: Encoder | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = encoder if encoder is not None else make_encoder(cfg)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    @classmethod
    def from_autoencoder(cls, ae: AutoEncoder, num_classes: int) -> "Classifier":
        """Transfer: a classifier whose encoder is a copy of ``ae.encoder`` (the AE is untouched)."""
        return cls(replace(ae.config, num_classes=num_classes), encoder=copy.deepcopy(ae.encoder))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for ``num_classes`` classes."""
        self.config = replace(self.config, num_classes=num_classes)
        self.head = nn.Linear(self.config.feature_dim, num_classes).to(self.head.weight.device)


def make_encoder(cfg: ModelConfig) -> nn.Module:  # Encoder, or patchnet.PatchEncoder for arch "patch"
    return PatchEncoder(cfg) if cfg.arch == "patch" else Encoder(cfg)


def build_model(kind: str, cfg: ModelConfig) -> nn.Module:
    """``kind`` is ``"autoencoder"`` or ``"classifier"``."""
    if kind not in ("autoencoder", "classifier"):
        raise ValueError(f"unknown model kind {kind!r}")
    return AutoEncoder(cfg) if kind == "autoencoder" else Classifier(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARCHS", "UPSAMPLE_MODES", "NORMS", "OUTPUT_ACTIVATIONS", "ModelConfig", "Encoder", "Decoder", "AutoEncoder",
           "Classifier", "make_encoder", "build_model", "count_parameters"]
