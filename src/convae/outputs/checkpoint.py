"""Checkpoints: a plain dict (``model`` state dict + ``config``) loadable with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config.validation import model_config_from_dict
from ..models import build_model
from ..utils.device import resolve_device
from ..utils.errors import ConvaeError, first_line
from ..utils.files import atomic_torch_save

FORMAT = "convae-checkpoint"
VERSION = 1
KINDS = ("autoencoder", "classifier")  # what a checkpoint holds; an encoder travels as a hub folder or an export
EXPORTED = {".onnx": "ONNX", ".pt2": "torch.export", ".safetensors": "safetensors; convae.load reads it"}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    kind: str,
    classes: list[str] | None = None,
    run_config: dict | None = None,
) -> None:
    """Save ``model`` (an AutoEncoder or Classifier) with the config that rebuilds it."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "model": state,
        "config": model.config.to_dict(),
        "classes": list(classes) if classes else [],
        "run_config": run_config or {},
    }
    atomic_torch_save(payload, Path(path))


def is_state_dict(v: object) -> bool:
    """Whether untrusted ``v`` is a mapping of names to ordinary tensors (dense, in memory: a sparse,
    meta or quantised tensor is no weight convae writes)."""
    return isinstance(v, dict) and all(
        isinstance(k, str) and type(t) is torch.Tensor and t.layout == torch.strided and t.device.type == "cpu"
        for k, t in v.items()
    )


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse weights that are NaN or infinite: every prediction from them would be meaningless."""
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ConvaeError(
            f"{source} holds weights that are NaN or infinite ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}); it cannot be used",
            advice="use a checkpoint of a run that did not diverge",
        )


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict`` whose failure names every tensor that differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape differs: " + "; ".join(shapes[:6]) + (" ..." if len(shapes) > 6 else ""))
        if missing:
            parts.append("missing: " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:6]) + (" ..." if len(unexpected) > 6 else ""))
        raise ConvaeError(f"{source} does not match the model architecture: " + " | ".join(parts))
    model.load_state_dict(state)


def read_checkpoint(path: str | Path) -> dict:
    """Load the raw checkpoint dict; never unpickles arbitrary objects (weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise ConvaeError(f"checkpoint not found: {p}")
    if p.suffix.lower() in EXPORTED:
        raise ConvaeError(
            f"{p} is an exported model ({EXPORTED[p.suffix.lower()]}), not a convae checkpoint: "
            "convae's commands read the checkpoints/*.pt files of a run"
        )
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own advice (weights_only=False, i.e. run the file's code) is not given on: never safe here
        why = (
            "it holds objects other than tensors and plain data"
            if "Weights only load failed" in str(e)
            else first_line(e, 120)
        )
        raise ConvaeError(f"{p} is not a loadable convae checkpoint (refused by the safe loader: {why})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConvaeError(f"{p} is not a convae checkpoint (no '{FORMAT}' marker)")
    if payload.get("kind") not in KINDS or "model" not in payload or "config" not in payload:
        raise ConvaeError(f"{p} is a damaged convae checkpoint (kind, model or config missing)")
    if not is_state_dict(payload["model"]):
        raise ConvaeError(f"{p} is a damaged convae checkpoint (its model is not a mapping of names to tensors)")
    classes = payload.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ConvaeError(f"{p} is a damaged convae checkpoint (its classes are not a list of names)")
    if not isinstance(payload.get("run_config", {}), dict):
        raise ConvaeError(f"{p} is a damaged convae checkpoint (its run config is not a mapping)")
    return payload


def rebuild(kind: str, config: object, state: dict, classes: object, source: str) -> nn.Module:
    """The one rebuild from untrusted parts, for checkpoints, hub folders and safetensors exports: the
    ``kind`` of model (autoencoder, classifier, encoder) that ``config`` describes, validated before any
    allocation, with ``state`` loaded strictly, its weights checked finite and ``classes`` attached."""
    cfg = model_config_from_dict(config, where=f"{source}: ")
    if (
        not isinstance(classes, list)
        or not all(isinstance(c, str) for c in classes)
        or (kind == "classifier" and classes and len(classes) != cfg.num_classes)
    ):
        raise ConvaeError(
            f"{source} holds damaged class names (not {cfg.num_classes} class names for a classifier "
            f"of {cfg.num_classes} outputs)"
        )
    model = build_model(kind, cfg)
    load_state_strict(model, state, source=source)
    check_finite(model, source)
    model.classes = list(classes)
    return model


def load_checkpoint(path: str | Path, kind: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint holds; ``kind`` (if given) must match."""
    payload = read_checkpoint(path)
    if kind is not None and payload["kind"] != kind:
        raise ConvaeError(
            f"{path} holds a{'n' if payload['kind'][0] in 'aeiou' else ''} {payload['kind']}; "
            f"this command needs a{'n' if kind[0] in 'aeiou' else ''} {kind} checkpoint"
        )
    # the config inside a checkpoint is as untrusted as the file: validated before any allocation
    model = rebuild(payload["kind"], payload["config"], payload["model"], payload.get("classes", []), str(path))
    return model, payload


def open_model(path: str | Path, device: str = "auto", kind: str | None = None) -> tuple[nn.Module, dict, torch.device]:
    """The common opening of every command that uses a trained model: the checkpoint rebuilt,
    on the resolved device, channels_last, in eval mode; with its payload and the device."""
    dev = resolve_device(device)
    model, payload = load_checkpoint(path, kind=kind)
    return model.to(dev, memory_format=torch.channels_last).eval(), payload, dev
