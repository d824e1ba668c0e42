"""The networks: the architecture registry, one module per architecture, the autoencoder and the classifier
built from any of them, and the pretraining objectives.

``registry`` holds the encoder interface (:class:`EncoderBase`), :class:`Architecture`,
:func:`register_architecture` and the knobs every architecture reads; ``stages`` (the lecture's),
``patch`` and ``blocks`` are the architectures, each with its own knobs; ``model_config`` imports
them (a new architecture is its name in ``ARCHITECTURE_MODULES`` there) and joins their knobs into :class:`ModelConfig`;
``autoencoder`` builds :class:`AutoEncoder` and :class:`Classifier` and sizes them; ``objectives``
holds the pretraining objectives and :func:`register_objective`; ``reference`` is the lecture's own
code and numbers, for comparison only.
"""

from .autoencoder import (
    KINDS,
    AutoEncoder,
    Classifier,
    build_model,
    count_parameters,
    kind_of,
    make_encoder,
    model_size,
    training_bytes,
)
from .model_config import ModelConfig, ModelKnobs
from .objectives import Objective, register_objective
from .registry import UPSAMPLE_MODES, Architecture, EncoderBase, register_architecture
from .stages import Encoder

__all__ = [
    "KINDS",
    "UPSAMPLE_MODES",
    "Architecture",
    "AutoEncoder",
    "Classifier",
    "Encoder",
    "EncoderBase",
    "ModelConfig",
    "ModelKnobs",
    "Objective",
    "build_model",
    "count_parameters",
    "kind_of",
    "make_encoder",
    "model_size",
    "register_architecture",
    "register_objective",
    "training_bytes",
]
