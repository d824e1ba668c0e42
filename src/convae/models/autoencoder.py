"""The autoencoder and the classifier, for every registered architecture.

The encoder is one module shared by construction: ``AutoEncoder.encoder`` and
``Classifier.encoder`` are the same class (the architecture's :class:`~convae.models.registry.EncoderBase`),
so transfer is a state-dict copy and nothing else (timm's ``forward_features`` /
``reset_classifier`` interface). The architectures are :mod:`convae.models.stages` (the lecture's),
:mod:`convae.models.patch` and :mod:`convae.models.blocks`; importing them registers them.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import torch
from torch import nn

from .model_config import ModelConfig
from .registry import ARCHITECTURES, NORMS, OUTPUT_ACTIVATIONS, UPSAMPLE_MODES, EncoderBase, architecture
from .stages import Decoder, Encoder

# ----------------------------------------------------------------------------- autoencoder


class AutoEncoder(nn.Module):
    """Encoder + decoder, trained by reconstruction without labels."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = make_encoder(cfg)
        self.decoder = architecture(cfg.arch).decoder(cfg)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor, code_fn=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction of ``x``; ``code_fn`` (code -> code), when given, acts on the code
        between encoder and decoder (the sparse objectives' winner-take-all); ``mask`` (B, 1, H, W),
        1 on the pixels hidden from ``x``, is the masked objective's (see ``EncoderBase.masked_code``)."""
        code, context = self.encoder.code(x) if mask is None else self.encoder.masked_code(x, mask)
        return self.decoder(code if code_fn is None else code_fn(code), context)


# ----------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
    """The same encoder plus a linear head: (B, 3, 32, 32) -> (B, 1024) -> (B, num_classes)."""

    def __init__(self, cfg: ModelConfig, encoder: EncoderBase | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = encoder if encoder is not None else make_encoder(cfg)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    @classmethod
    def from_autoencoder(cls, ae: AutoEncoder, num_classes: int) -> Classifier:
        """Transfer: a classifier whose encoder is a copy of ``ae.encoder`` (the AE is untouched)."""
        return cls(replace(ae.config, num_classes=num_classes), encoder=copy.deepcopy(ae.encoder))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.tta and not self.training:  # test-time flip: the mean of both views' logits
            return (self.head(self.encoder(x)) + self.head(self.encoder(x.flip(3)))) / 2
        return self.head(self.encoder(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for ``num_classes`` classes."""
        self.config = replace(self.config, num_classes=num_classes)
        self.head = nn.Linear(self.config.feature_dim, num_classes).to(self.head.weight.device)


# ----------------------------------------------------------------------------- building and sizing


def make_encoder(cfg: ModelConfig) -> EncoderBase:
    """The encoder of ``cfg.arch``, as the registry builds it."""
    return architecture(cfg.arch).encoder(cfg)


KINDS = {"autoencoder": AutoEncoder, "classifier": Classifier, "encoder": make_encoder}


def build_model(kind: str, cfg: ModelConfig) -> nn.Module:
    """``kind`` is ``"autoencoder"``, ``"classifier"`` or ``"encoder"``."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}")
    return KINDS[kind](cfg)


def kind_of(model: nn.Module) -> str | None:
    """``"autoencoder"``, ``"classifier"``, ``"encoder"`` (any registered architecture's) or None."""
    if isinstance(model, EncoderBase):
        return "encoder"
    return next((k for k, c in KINDS.items() if isinstance(c, type) and type(model) is c), None)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every batch norm of ``model`` (``modules()`` walks into a DDP or torch.compile wrapper too)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


SMALL_ACTIVATIONS = 2**27  # below this bound (values), one image's activations are counted on the CPU
SMALL_PARAMETERS = 2**24  # ... and the weights (uninitialised, 64 MiB at most) allocated for it
UNBUILDABLE = 2**62  # the size said of a model whose tensors' sizes overflow


@functools.lru_cache(maxsize=64)
def model_size(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, activations per image) of training ``cfg``'s autoencoder and its classifier's
    head, from the real modules, built on the meta device (nothing allocated, no random numbers).

    The activations are every leaf module's output in one forward pass of the autoencoder (what
    the backward pass keeps, roughly). The pass runs on the meta device when an upper bound on
    them is large (sizes only; its first call costs a second of imports), else on the CPU with
    uninitialised weights, which is exact and takes milliseconds."""
    try:
        with torch.device("meta"):
            ae = AutoEncoder(replace(cfg, num_classes=1))
    except (RuntimeError, OverflowError, ValueError, TypeError):  # a size that overflows 64 bits: no machine holds it
        return UNBUILDABLE, UNBUILDABLE
    params = count_parameters(ae) + (cfg.feature_dim + 1) * cfg.num_classes
    leaves = [m for m in ae.modules() if not list(m.children())]
    widest = max([cfg.in_channels] + [t.shape[0] for t in ae.state_dict().values() if t.ndim])
    bound = (len(leaves) + 4) * widest * cfg.height * cfg.width
    device = "meta" if bound > SMALL_ACTIVATIONS or params > SMALL_PARAMETERS else "cpu"
    # eval mode: a batch norm in training mode refuses one image on a 1x1 map; the sizes are the same
    ae = ae.to_empty(device=device).eval()
    activations = [0]

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            activations[0] += output.numel()

    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            ae(torch.zeros(1, cfg.in_channels, cfg.height, cfg.width, device=device))
    except (RuntimeError, OverflowError, ValueError, TypeError):
        return params, UNBUILDABLE
    finally:
        for h in hooks:
            h.remove()
    return params, activations[0]


def training_bytes(cfg: ModelConfig, images: int) -> int:
    """A floor on the memory training ``cfg`` needs for ``images`` images at once (fp32 Adam):
    weights, gradients and two moments per parameter, and each activation and its gradient."""
    params, activations = model_size(cfg)
    return 16 * params + 2 * 4 * activations * images


__all__ = [
    "ARCHITECTURES",
    "UPSAMPLE_MODES",
    "NORMS",
    "OUTPUT_ACTIVATIONS",
    "ModelConfig",
    "EncoderBase",
    "Encoder",
    "Decoder",
    "AutoEncoder",
    "Classifier",
    "make_encoder",
    "build_model",
    "kind_of",
    "count_parameters",
    "model_size",
    "training_bytes",
]
