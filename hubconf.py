"""torch.hub entry points: ``torch.hub.load(REPO, "autoencoder", source="local")``.

Each returns a fresh model (any config key as a keyword, as ``convae.build``), or with
``pretrained=FOLDER`` the model saved there by ``convae.save_pretrained``.
"""

import sys
from pathlib import Path

dependencies = ["torch", "torchvision", "safetensors"]

try:
    import convae
except ImportError:  # a checkout that was not pip-installed: the package lives under src/
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    import convae


def _entry(kind: str, pretrained: str | None, kwargs: dict):
    if pretrained:
        model = convae.from_pretrained(pretrained)
        if convae.models.kind_of(model) != kind:
            raise convae.utils.errors.ConvaeError(f"{pretrained} holds a {type(model).__name__}, not a {kind}")
        return model
    return convae.build(kind, **kwargs)


def autoencoder(pretrained: str | None = None, **kwargs):
    """The lecture's convolutional autoencoder (or ``pretrained``'s)."""
    return _entry("autoencoder", pretrained, kwargs)


def classifier(pretrained: str | None = None, **kwargs):
    """The classifier on the same encoder (or ``pretrained``'s)."""
    return _entry("classifier", pretrained, kwargs)


def encoder(pretrained: str | None = None, **kwargs):
    """The encoder alone (or ``pretrained``'s)."""
    return _entry("encoder", pretrained, kwargs)
