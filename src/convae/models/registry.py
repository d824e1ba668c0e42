"""The model's shared knobs, the encoder interface every architecture implements, and their registry.

An architecture is one module (``stages``, ``patch``, ``blocks`` here) that subclasses
:class:`EncoderBase`, writes a decoder that reads what the encoder's :meth:`~EncoderBase.code`
gives, declares its own knobs, and calls :func:`register_architecture`. Everything else (the autoencoder, the
classifier, validation, the command line, export, the hub folder, the figures) asks the registry
or talks to the interface; nothing tests an architecture's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.sources import MAX_CLASSES
from ..utils.errors import ConvaeError
from ..utils.knobs import Among, Choice, Flag, Int, Num, Widths, check_all, knob

UPSAMPLE_MODES = ("bilinear", "nearest", "transposed", "unpool")
NORMS = ("none", "batch", "group")
# the decoder's output activation, by name: the --output-activation choices
OUTPUT_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "none": nn.Identity}


def arch_names() -> tuple[str, ...]:
    return tuple(ARCHITECTURES)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SharedKnobs:
    """The model's settings every architecture reads; an architecture's own are its ``knobs``
    (:class:`~convae.models.model_config.ModelKnobs` joins them; ``Config`` inherits that)."""

    in_channels: int = knob(
        3,
        Among((1, 3), "1 (grey) or 3 (RGB)"),
        "image channels (default 3); images are converted to it",
        group="model",
        metavar="C",
    )
    height: int = knob(32, Int(1), "image height (default 32); images are resized to it", group="model", metavar="H")
    width: int = knob(32, Int(1), "image width (default 32)", group="model", metavar="W")
    channels: tuple[int, ...] = knob(
        (64, 128, 128),
        Widths(),
        "conv encoder widths, one per stride-2 stage (default 64 128 128)",
        group="model",
        metavar="N",
    )
    latent_dim: int = knob(1024, Int(1), "size of the latent vector (default 1024)", group="model", metavar="N")
    upsample: str = knob(
        "bilinear", Choice(UPSAMPLE_MODES), "decoder upsampling (default bilinear, as the lecture)", group="model"
    )
    norm: str = knob(
        "none", Choice(NORMS), "normalisation after every conv (default none, as the lecture)", group="model"
    )
    convs_per_stage: int = knob(
        1, Int(1, 64), "3x3 convs per encoder and decoder stage (default 1)", group="model", metavar="N"
    )
    output_activation: str = knob(
        "relu",
        Choice(tuple(OUTPUT_ACTIVATIONS)),
        "decoder output activation (default relu, as the lecture; none for normalised targets)",
        group="model",
    )
    arch: str = knob(
        "stages",
        Choice(arch_names),
        "the architecture: stages (default: the lecture's stride-2 conv stages and FC latent), blocks (the "
        "classifier: whitened stem, conv-pool-norm blocks, global max pooling; --preset blocks) or patch (one wide "
        "conv of --kernel-size filters, --channels of them, features pooled over quadrants)",
        group="model",
    )
    tta: bool = knob(
        False,
        Flag(),
        "the classifier averages its logits over each image and its mirror image when "
        "evaluating and predicting (test-time flip)",
        group="finetune",
    )


@dataclass(frozen=True)
class BaseModelConfig(SharedKnobs):
    """What every architecture's config holds beside its own knobs: the shared knobs, the LeakyReLU's
    slope, the classes; :class:`~convae.models.model_config.ModelConfig` adds every architecture's knobs."""

    negative_slope: float = knob(0.1, Num(None), flag=False)  # LeakyReLU's slope (any finite number)
    num_classes: int = knob(10, Int(1, hi=MAX_CLASSES), flag=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    @property
    def feature_dim(self) -> int:
        """What the encoder returns for the classifier's head (the FC latent, pooled maps, ...)."""
        return architecture(self.arch).feature_dim(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BaseModelConfig:
        return cls(**d)  # checkpoints from before a knob existed get its default


# ----------------------------------------------------------------------------- the encoder interface


Code = tuple[torch.Tensor, Any]  # what the decoder reads, and what else it needs (indices, the input)


class EncoderBase(nn.Module):
    """The interface every encoder gives; the classifier and the autoencoder share it by construction.

    - ``forward(x)``: the features the classifier's head reads, (B, feature_dim);
    - ``forward_pooled(x)``: spatially pooled conv features for the probes;
    - ``code(x)``: ``(code, context)``, what the architecture's decoder reconstructs from;
      objectives that act on the code (sparsity) act on ``code``; ``masked_code(x, mask)`` the
      same for the masked objective, which says which pixels it hid;
    - ``kernels()``: the first layer's kernels as they act on pixels, (K, C, k, k), for the figures;
    - ``fit_images`` and ``fit_to_data``: statistics some encoders fit on the training images
      before pretraining (the patch network's whitening); none by default.
    """

    config: BaseModelConfig
    fit_images: int = 0

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def code(self, x: torch.Tensor) -> Code:  # pragma: no cover - every architecture gives its own
        raise NotImplementedError

    def masked_code(self, x: torch.Tensor, mask: torch.Tensor) -> Code:
        """``code`` of ``x`` whose pixels under ``mask`` (1 = hidden) are zeroed; by default the
        zeros are all it knows of the mask (dense masking). An encoder may keep hidden positions
        from leaking into visible ones (the blocks network)."""
        return self.code(x)

    def kernels(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def fit_to_data(self, x: torch.Tensor, generator: torch.Generator) -> str | None:
        """Fit what the encoder needs from float images ``x`` in [0, 1]; a line for the log."""
        return None


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Architecture:
    """One architecture: its encoder and decoder, its head's input size, its rules and presets.

    ``decoder(cfg)`` is a module called as ``decoder(code, context)`` with what the encoder's
    ``code`` returned. ``check(cfg, where)`` raises :class:`ConvaeError` for a config the
    architecture cannot build (beyond every knob's own rule). ``objectives`` lists the only
    objectives that train it (None: every objective that does not name its architectures).
    ``presets`` are named recipes (config keys) that need this architecture. ``knobs`` is a frozen
    dataclass of the settings only this architecture reads, declared with :func:`~convae.utils.knobs.knob`
    (their flags, help, rules and place in saved configs follow from it; another architecture's run
    refuses them set). ``check_run(cfg, where)`` holds the rules that join them with the rest of a run's
    config (the objective, ...).
    """

    name: str
    encoder: Callable[[BaseModelConfig], EncoderBase]
    decoder: Callable[[BaseModelConfig], nn.Module]
    feature_dim: Callable[[BaseModelConfig], int]
    check: Callable[[BaseModelConfig, str], None] = lambda cfg, where: None
    objectives: tuple[str, ...] | None = None
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    knobs: type | None = None
    check_run: Callable[[Any, str], None] = lambda cfg, where: None


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add ``arch`` to the registry (a second one of the same name replaces the first)."""
    ARCHITECTURES[arch.name] = arch
    return arch


def unregister_architecture(name: str) -> None:
    ARCHITECTURES.pop(name, None)


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ConvaeError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None


def check_model(cfg: BaseModelConfig, where: str = "") -> None:
    """Every knob's rule, then the architecture's own."""
    check_all(cfg, where)
    architecture(cfg.arch).check(cfg, where)


__all__ = [
    "UPSAMPLE_MODES",
    "NORMS",
    "OUTPUT_ACTIVATIONS",
    "SharedKnobs",
    "BaseModelConfig",
    "EncoderBase",
    "Architecture",
    "ARCHITECTURES",
    "register_architecture",
    "unregister_architecture",
    "architecture",
    "check_model",
]
