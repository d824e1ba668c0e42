"""The model's config: the shared knobs joined with every architecture's own, and :class:`ModelConfig`.

Importing an architecture's module registers it and its knobs; this module imports them, so a new
architecture is its module and one import line here. The order of the imports is the order of
the ``--arch`` choices (the lecture's first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..utils.knobs import Int, Num, knob

# isort: off
from . import stages  # noqa: F401  (registers the lecture's architecture)
from . import patch  # noqa: F401  (registers the patch architecture)
from . import blocks  # noqa: F401  (registers the blocks architecture)
# isort: on

from .registry import ARCHITECTURES, SharedKnobs, architecture

# a dataclass's fields come in reverse MRO: the shared ones first, then each architecture's in registration order
_OWN_KNOBS = [a.knobs for a in ARCHITECTURES.values() if a.knobs is not None]


@dataclass(frozen=True)
class ModelKnobs(*reversed(_OWN_KNOBS), SharedKnobs):
    """The model's settings as the run config holds them (``Config`` inherits these fields)."""


@dataclass(frozen=True)
class ModelConfig(ModelKnobs):
    """Everything needed to rebuild a model; stored in every checkpoint."""

    negative_slope: float = knob(0.1, Num(None), flag=False)  # LeakyReLU's slope (any finite number)
    num_classes: int = knob(10, Int(1), flag=False)

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
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)  # checkpoints from before a knob existed get its default


def model_knobs(obj: Any) -> dict[str, Any]:
    """The model knobs of ``obj`` (a run ``Config`` or a ``ModelConfig``) as keyword arguments."""
    return {f: getattr(obj, f) for f in ModelKnobs.__dataclass_fields__}


def owner(name: str) -> str | None:
    """The architecture whose own knob ``name`` is (None: a shared knob, or not a model knob)."""
    for a in ARCHITECTURES.values():
        if a.knobs is not None and name in a.knobs.__dataclass_fields__:
            return a.name
    return None
