"""The model's config: the shared knobs joined with every architecture's own, and :class:`ModelConfig`.

Importing an architecture's module registers it and its knobs; this module imports them, so a new
architecture is its module and its name in ``ARCHITECTURE_MODULES`` here. Their order is the order of
the ``--arch`` choices (the lecture's first).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .registry import ARCHITECTURES, BaseModelConfig, SharedKnobs

ARCHITECTURE_MODULES = ("stages", "patch", "blocks")
for _module in ARCHITECTURE_MODULES:  # each registers itself, and its knobs, when imported
    importlib.import_module(f".{_module}", __package__)

# a dataclass's fields come in reverse MRO: the shared ones first, then each architecture's in registration order
_OWN_KNOBS = [a.knobs for a in ARCHITECTURES.values() if a.knobs is not None]


@dataclass(frozen=True)
class ModelKnobs(*reversed(_OWN_KNOBS), SharedKnobs):
    """The model's settings as the run config holds them (``Config`` inherits these fields)."""


@dataclass(frozen=True)
class ModelConfig(*reversed(_OWN_KNOBS), BaseModelConfig):
    """Everything needed to rebuild a model; stored in every checkpoint."""


def model_knobs(obj: Any) -> dict[str, Any]:
    """The model knobs of ``obj`` (a run ``Config`` or a ``ModelConfig``) as keyword arguments."""
    return {f: getattr(obj, f) for f in ModelKnobs.__dataclass_fields__}


def owner(name: str) -> str | None:
    """The architecture whose own knob ``name`` is (None: a shared knob, or not a model knob)."""
    for a in ARCHITECTURES.values():
        if a.knobs is not None and name in a.knobs.__dataclass_fields__:
            return a.name
    return None
