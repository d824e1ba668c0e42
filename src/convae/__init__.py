"""convae: convolutional autoencoders for unsupervised representation learning.

Pretrain an encoder by reconstruction, look inside it, transfer it into a classifier and
fine-tune it with few labels. ``convae.build``, ``convae.load``, ``convae.encode``,
``convae.predict`` and ``convae.transform`` are the entry points from Python;
``convae.pretrain``/``finetune``/``run`` train as the CLI does, on paths, tensors or Datasets.
"""

__version__ = "0.1.0"

from .api import Prediction, build, encode, finetune, load, predict, pretrain, run, transform
from .models import AutoEncoder, Classifier, Encoder, ModelConfig
from .outputs.hub import from_pretrained, save_pretrained
from .training import supervised  # noqa: F401  (the training package registers the modes --joint chooses)

__all__ = [
    "__version__",
    "build",
    "load",
    "encode",
    "transform",
    "predict",
    "Prediction",
    "pretrain",
    "finetune",
    "run",
    "save_pretrained",
    "from_pretrained",
    "AutoEncoder",
    "Classifier",
    "Encoder",
    "ModelConfig",
]
