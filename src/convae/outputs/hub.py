"""Sharing models in the Hugging Face layout: a folder with ``config.json`` and ``model.safetensors``.

``save_pretrained(model, folder)`` writes it; ``from_pretrained(folder)`` rebuilds the model
(autoencoder, classifier or bare encoder), validating the config as untrusted input. A folder
pushed to the Hugging Face Hub as is loads back after ``huggingface_hub.snapshot_download``;
``hubconf.py`` at the repository root serves the same through ``torch.hub.load``.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..models import KINDS, kind_of
from ..utils.device import convae_version
from ..utils.errors import ConvaeError, clip, first_line
from ..utils.files import atomic_write_bytes, atomic_write_text
from .checkpoint import rebuild

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_pretrained(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model`` (with its config and class names) into ``folder``; returns the folder."""
    from safetensors.torch import save

    kind = kind_of(model)
    if kind is None:
        raise ConvaeError(
            f"save_pretrained takes a convae AutoEncoder, Classifier or encoder, got {type(model).__name__}"
        )
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {
        "convae_kind": kind,
        "convae_version": convae_version(),
        "classes": list(getattr(model, "classes", [])),
        **model.config.to_dict(),
    }
    atomic_write_bytes(folder / WEIGHTS_NAME, save(state))
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def from_pretrained(folder: str | Path) -> nn.Module:
    """The model saved in ``folder`` by :func:`save_pretrained`, in eval mode, with ``classes``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise ConvaeError(f"{folder} is not a saved convae model (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads((folder / CONFIG_NAME).read_bytes().decode("utf-8"))
        state = load_file(str(folder / WEIGHTS_NAME))
    except Exception as e:
        raise ConvaeError(f"{folder} holds a damaged model ({clip(first_line(e), 100)})") from None
    if not isinstance(config, dict) or config.get("convae_kind") not in KINDS:
        raise ConvaeError(f"{folder / CONFIG_NAME} is not a convae model config (no convae_kind)")
    kind, classes = config.pop("convae_kind"), config.pop("classes", [])
    config.pop("convae_version", None)
    return rebuild(kind, config, state, classes, str(folder)).eval()
