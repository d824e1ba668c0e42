"""The networks: the architecture registry, one module per architecture, the autoencoder and the classifier
built from any of them, and the pretraining objectives.

``registry`` holds the encoder interface (:class:`EncoderBase`), :class:`Architecture` and
:func:`register_architecture`; ``stages`` (the lecture's), ``patch`` and ``blocks`` are the
architectures; ``autoencoder`` builds :class:`AutoEncoder` and :class:`Classifier` and sizes them;
``objectives`` holds the pretraining objectives and :func:`register_objective`; ``reference`` is
the lecture's own code and numbers, for comparison only.
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
from .objectives import Objective, register_objective
from .registry import UPSAMPLE_MODES, Architecture, EncoderBase, ModelConfig, register_architecture
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
