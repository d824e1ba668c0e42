"""The Python API: build, load, encode, and the training phases from code.

Build the lecture's autoencoder and encode a batch:

>>> import torch, convae
>>> ae = convae.build("autoencoder")
>>> ae(torch.rand(2, 3, 32, 32)).shape
torch.Size([2, 3, 32, 32])
>>> convae.encode(ae, torch.rand(5, 3, 32, 32)).shape
torch.Size([5, 1024])

Any config key changes the model, as the CLI flags do:

>>> clf = convae.build("classifier", num_classes=4, in_channels=1, height=28, width=28)
>>> clf(torch.rand(3, 1, 28, 28)).shape
torch.Size([3, 4])
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .config import INFERENCE_BATCH_SIZE, Config, build_config
from .errors import ConvaeError
from .models import AutoEncoder, Classifier, Encoder, ModelConfig, build_model

MODEL_KEYS = {f.name for f in fields(ModelConfig)} - {"num_classes", "negative_slope"}


def build(kind: str = "autoencoder", preset: str = "seed", num_classes: int = 10, **overrides: Any) -> nn.Module:
    """A fresh ``"autoencoder"``, ``"classifier"`` or ``"encoder"`` from a preset plus config keys.

    The model's :class:`~convae.models.ModelConfig` is at ``model.config``.
    """
    cfg = build_config(preset, None, overrides)
    mcfg = cfg.model_config(num_classes)
    if kind == "encoder":
        return Encoder(mcfg)
    if kind not in ("autoencoder", "classifier"):
        raise ConvaeError(f"kind must be autoencoder, classifier or encoder; got {kind!r}")
    return build_model(kind, mcfg)


def load(path: str | Path) -> nn.Module:
    """The model in a convae checkpoint (``.pt``) or safetensors export, in eval mode.

    ``model.config`` rebuilds it; ``model.classes`` lists the class names (empty if unknown).
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from .export import load_safetensors

        return load_safetensors(p)
    model, payload = load_checkpoint(p)
    model.classes = payload.get("classes", [])
    return model.eval()


def encode(model: nn.Module, images: torch.Tensor, batch_size: int = INFERENCE_BATCH_SIZE) -> torch.Tensor:
    """Latent vectors (N, latent_dim) of ``images`` (N, C, H, W): uint8 0-255 or float in [0, 1].

    ``model`` is an autoencoder, a classifier or a bare encoder; it runs in eval mode on its
    own device, and the result comes back on the CPU.
    """
    from .probes import extract_features

    encoder = model if isinstance(model, Encoder) else model.encoder
    if images.shape[0] == 0:
        return torch.empty(0, encoder.config.latent_dim)
    return extract_features(encoder, images, batch_size).cpu()


def _train(phases: tuple[str, ...], checkpoint: str | None, preset: str, overrides: dict[str, Any]) -> Path:
    from .pipeline import run_training

    cfg: Config = build_config(preset, None, overrides)
    run = run_training(cfg, phases=phases, checkpoint=checkpoint, log=lambda m: None)
    return run.path


def pretrain(data: str, preset: str = "seed", **overrides: Any) -> AutoEncoder:
    """``convae pretrain`` from code; returns the trained autoencoder (its run folder is ``out``)."""
    path = _train(("pretrain",), None, preset, {"data": data, **overrides})
    return load(path / "checkpoints" / "autoencoder.pt")


def finetune(data: str, checkpoint: str | Path | None = None, preset: str = "seed", **overrides: Any) -> Classifier:
    """``convae finetune`` from code; ``checkpoint`` is an autoencoder (omit it with ``init="scratch"``)."""
    path = _train(("finetune",), None if checkpoint is None else str(checkpoint), preset, {"data": data, **overrides})
    return load(path / "checkpoints" / "classifier.pt")


def run(data: str = "cifar10", preset: str = "seed", **overrides: Any) -> Path:
    """``convae run`` from code; returns the run folder."""
    return _train(("pretrain", "finetune"), None, preset, {"data": data, **overrides})
