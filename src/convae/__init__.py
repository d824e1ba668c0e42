"""convae: convolutional autoencoders for unsupervised representation learning.

Pretrain an encoder by reconstruction, look inside it, transfer it into a classifier and
fine-tune it with few labels. ``convae.build``, ``convae.load`` and ``convae.encode`` are the
entry points from Python; ``convae.pretrain``/``finetune``/``run`` train as the CLI does.
"""

__version__ = "0.1.0"

from .api import build, encode, finetune, load, pretrain, run  # noqa: E402
from .models import AutoEncoder, Classifier, Encoder, ModelConfig  # noqa: E402

__all__ = ["__version__", "build", "load", "encode", "pretrain", "finetune", "run",
           "AutoEncoder", "Classifier", "Encoder", "ModelConfig"]
