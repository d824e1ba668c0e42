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

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import INFERENCE_BATCH_SIZE, Config, build_config
from .models import KINDS, AutoEncoder, Classifier, EncoderBase, ModelConfig, build_model
from .outputs.checkpoint import load_checkpoint
from .utils.errors import ConvaeError


def _check(name: str, value: Any) -> None:
    """An argument checked as its config flag is (the same rule, the same one-line error)."""
    Config.__dataclass_fields__[name].metadata["rule"](name, value)


def build(kind: str = "autoencoder", preset: str = "seed", num_classes: int = 10, **overrides: Any) -> nn.Module:
    """A fresh ``"autoencoder"``, ``"classifier"`` or ``"encoder"`` from a preset plus config keys.

    The model's :class:`~convae.models.ModelConfig` is at ``model.config``.
    """
    if kind not in KINDS:  # before the config: a wrong kind is said first
        raise ConvaeError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    ModelConfig.__dataclass_fields__["num_classes"].metadata["rule"]("num_classes", num_classes)
    return build_model(kind, build_config(preset, None, overrides).model_config(num_classes))


def load(path: str | Path) -> nn.Module:
    """The model in a convae checkpoint (``.pt``) or safetensors export, in eval mode.

    ``model.config`` rebuilds it; ``model.classes`` lists the class names (empty if unknown).
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from .commands.export import load_safetensors

        return load_safetensors(p)
    model, payload = load_checkpoint(p)
    model.classes = payload.get("classes", [])
    return model.eval()


def transform(model: nn.Module):
    """The preprocessing of training as a function for ``model``'s input format (timm's
    ``create_transform``): images as tensors, numpy arrays (CHW or HWC, uint8 or float in
    [0, 1]), PIL images or lists of them -> uint8 (N, C, H, W) with the model's channels and size
    (antialiased resize, grey <-> RGB, alpha dropped). Anything else is one :class:`ConvaeError`."""
    from .data.memory import to_model_format

    cfg = model.config
    return lambda images: to_model_format(images, cfg.in_channels, cfg.height, cfg.width)


def _model_input(model: nn.Module, images: Any) -> torch.Tensor:
    cfg = model.config
    if (
        isinstance(images, torch.Tensor)
        and images.ndim == 4
        and images.is_floating_point()
        and tuple(images.shape[1:]) == (cfg.in_channels, cfg.height, cfg.width)
    ):
        if images.numel() and (not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1):
            raise ConvaeError("float images must hold values in [0, 1] (uint8 images 0-255)")
        return images  # already model input: used as given, not quantised to uint8
    return transform(model)(images)


def encode(model: nn.Module, images: Any, batch_size: int = INFERENCE_BATCH_SIZE) -> torch.Tensor:
    """Features (N, feature_dim) of ``images``, what the classifier's head reads (the ``stages`` network's FC latent),
    of anything :func:`transform` takes.

    ``model`` is an autoencoder, a classifier or a bare encoder; it runs in eval mode on its
    own device, and the result comes back on the CPU.
    """
    from .evaluation.probes import extract_features

    _check("batch_size", batch_size)
    encoder = model if isinstance(model, EncoderBase) else model.encoder
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] == 0:
        return torch.empty(0, encoder.config.feature_dim)
    return extract_features(encoder, _model_input(encoder, images), batch_size).cpu()


class Prediction(NamedTuple):
    """What :func:`predict` returns: per image the class name, its index and every class's probability."""

    classes: list[str]
    indices: torch.Tensor  # (N,) int64
    probabilities: torch.Tensor  # (N, num_classes) float32

    def __repr__(self) -> str:  # a summary, not every name and whole tensors
        n, first = len(self.classes), ", ".join(self.classes[:3])
        return (
            f"Prediction({n} image(s): {first}{', ...' if n > 3 else ''}; "
            f"probabilities {tuple(self.probabilities.shape)})"
        )


@torch.no_grad()
def predict(model: Classifier, images: Any, batch_size: int = INFERENCE_BATCH_SIZE) -> Prediction:
    """Class predictions of a classifier for ``images`` (anything :func:`transform` takes)."""
    from .data import to_model_input

    if not isinstance(model, Classifier):
        raise ConvaeError(f"predict needs a classifier, got {type(model).__name__}")
    _check("batch_size", batch_size)
    x_all = _model_input(model, images)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs = torch.cat(
        [
            torch.softmax(model(to_model_input(x_all[i : i + batch_size].to(device))).float(), 1).cpu()
            for i in range(0, len(x_all), batch_size)
        ]
    )
    model.train(was_training)
    names = list(getattr(model, "classes", []) or [str(i) for i in range(model.config.num_classes)])
    idx = probs.argmax(1)
    return Prediction([names[int(k)] for k in idx], idx, probs)


def _checkpoint_path(checkpoint: Any, cache_dir: str, log: Callable[[str], None] = print) -> str | None:
    """A path for ``checkpoint``: as given, or a model object saved once, by content, in the cache (said: the
    run's config names that file as where it started)."""
    if checkpoint is None or isinstance(checkpoint, (str, Path)):
        return None if checkpoint is None else str(checkpoint)
    if not isinstance(checkpoint, AutoEncoder):
        raise ConvaeError(
            f"checkpoint must be an autoencoder (what convae.pretrain returns) or a path; "
            f"got {type(checkpoint).__name__}"
        )
    import hashlib

    from .outputs.checkpoint import save_checkpoint
    from .utils.files import torch_bytes

    digest = hashlib.sha256(torch_bytes({k: v.detach().cpu() for k, v in checkpoint.state_dict().items()}))
    path = Path(cache_dir).expanduser() / "models" / f"autoencoder-{digest.hexdigest()[:16]}.pt"
    if not path.is_file():
        save_checkpoint(path, checkpoint, "autoencoder", list(getattr(checkpoint, "classes", [])))
        log(
            f"the autoencoder object was saved to {path} ({path.stat().st_size / 2**20:.1f} MiB), which the run names "
            "as its start; `convae cache clean --all` removes it"
        )
    return str(path)


def _train(
    phases: tuple[str, ...],
    data: Any,
    checkpoint: Any,
    preset: str,
    overrides: dict[str, Any],
    labels: Any,
    classes: list[str] | None,
    quiet: bool,
    on_epoch: Callable[[dict], None] | None,
) -> Path:
    from .commands.run import run_training
    from .data.memory import image_set

    log = (lambda m: None) if quiet else print
    cfg: Config = build_config(preset, None, overrides)
    if quiet and cfg.out is None:  # a folder appears in the working directory: said even when quiet
        import warnings

        warnings.warn(
            "convae writes this run's folder under runs/ in the current directory; pass out=DIR to choose where",
            stacklevel=3,
        )
    ckpt = _checkpoint_path(checkpoint, cfg.cache_dir, log)
    source = None
    if isinstance(data, (str, Path)):
        if labels is not None:
            raise ConvaeError("labels go with images in memory; a folder's labels are its class folders")
        cfg = replace(cfg, data=str(data))
    else:
        if ckpt is not None:  # the images take the checkpoint's format, as the run will
            cfg = cfg.with_model(load_checkpoint(ckpt, kind="autoencoder")[0].config)
        source = image_set(data, labels, classes, cfg.in_channels, cfg.height, cfg.width, log)
        cfg = replace(cfg, data=source.source)  # names the images in config.json and the report
    return run_training(cfg, phases=phases, checkpoint=ckpt, log=log, source=source, on_epoch=on_epoch).path


def _loaded(path: Path, name: str) -> nn.Module:
    model = load(path / "checkpoints" / name)
    model.run_dir = path  # where the config, metrics, figures and report.html are
    return model


def pretrain(
    data: Any,
    preset: str = "seed",
    *,
    labels: Any = None,
    classes: list[str] | None = None,
    quiet: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    **overrides: Any,
) -> AutoEncoder:
    """``convae pretrain`` from code; returns the trained autoencoder (its run folder is ``model.run_dir``).

    ``data`` is a source path (``cifar10``, a folder, an archive), images in memory (a uint8 or
    float tensor or array, N x C x H x W or N x H x W x C) or a ``torch.utils.data.Dataset``
    whose items are ``(image, label)`` or ``image``. Progress is printed as by the CLI unless
    ``quiet``; ``on_epoch(record)`` is called after every epoch.
    """
    path = _train(("pretrain",), data, None, preset, overrides, labels, classes, quiet, on_epoch)
    return _loaded(path, "autoencoder.pt")


def finetune(
    data: Any,
    checkpoint: Any = None,
    preset: str = "seed",
    *,
    labels: Any = None,
    classes: list[str] | None = None,
    quiet: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    **overrides: Any,
) -> Classifier:
    """``convae finetune`` from code. ``checkpoint`` is an autoencoder: the model
    :func:`pretrain` returned, or a checkpoint path (omit it with ``init="scratch"``). ``data``
    and ``labels`` as in :func:`pretrain` (labels are needed here). Returns the classifier, with
    ``model.run_dir``."""
    path = _train(("finetune",), data, checkpoint, preset, overrides, labels, classes, quiet, on_epoch)
    return _loaded(path, "classifier.pt")


def run(
    data: Any = "cifar10",
    preset: str = "seed",
    *,
    labels: Any = None,
    classes: list[str] | None = None,
    quiet: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    **overrides: Any,
) -> Path:
    """``convae run`` from code; returns the run folder."""
    return _train(("pretrain", "finetune"), data, None, preset, overrides, labels, classes, quiet, on_epoch)
