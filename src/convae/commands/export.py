"""Export a trained part (encoder, classifier, autoencoder) to ONNX, TorchScript or safetensors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..models import AutoEncoder, Classifier, ModelConfig
from ..outputs.checkpoint import load_checkpoint, rebuild
from ..utils.errors import ConvaeError, first_line
from ..utils.files import UMASK, make_parent, publish, remove_stale
from ..utils.records import Log

FORMATS = ("onnx", "pt2", "safetensors", "torchscript")  # pt2: torch.export, the successor of TorchScript
PARTS = ("encoder", "classifier", "autoencoder")
SAFETENSORS_MARKER = "convae"


def select_part(model: nn.Module, part: str, source: str = "checkpoint") -> nn.Module:
    """The ``part`` of a loaded AutoEncoder or Classifier; the encoder is in both."""
    if part == "encoder":
        return model.encoder
    if part == "classifier" and isinstance(model, Classifier):
        return model
    if part == "autoencoder" and isinstance(model, AutoEncoder):
        return model
    have = "autoencoder" if isinstance(model, AutoEncoder) else "classifier"
    raise ConvaeError(
        f"{source} holds a{'n' if have[0] == 'a' else ''} {have}: it has no {part} part",
        advice=f"choose --part encoder or --part {have}",
    )


def _example_input(cfg: ModelConfig, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, cfg.in_channels, cfg.height, cfg.width)


def _output_name(part: str) -> str:
    return {"encoder": "features", "classifier": "logits", "autoencoder": "reconstruction"}[part]


def preprocessing(cfg: ModelConfig) -> str:
    """How images must be prepared for an exported model: what ``convae.transform`` does."""
    colour = "RGB" if cfg.in_channels == 3 else "grey (L)"
    return (
        f"float32 N x {cfg.in_channels} x {cfg.height} x {cfg.width}, {colour}, values in [0, 1] (uint8 / 255); "
        f"images resized to {cfg.height}x{cfg.width} with antialiasing, no mean/std normalisation"
    )


def export_onnx(module: nn.Module, cfg: ModelConfig, part: str, out: Path, classes: list[str]) -> None:
    """ONNX with a dynamic batch axis (input ``images``, N x C x H x W in [0, 1]), one file, with the
    class names, the preprocessing and the config in its metadata."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter translates through it)
    except ImportError:
        raise ConvaeError("ONNX export needs onnx and onnxscript: pip install 'convae[export]'") from None

    module = module.eval()
    # torch.export-based exporter: it also covers max-unpooling, which the TorchScript one does not
    torch.onnx.export(
        module,
        (_example_input(cfg),),
        str(out),
        input_names=["images"],
        output_names=[_output_name(part)],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=18,
        dynamo=True,
        verbose=False,
    )
    # torch may write the weights beside the graph (x.onnx.data); a model this size fits in one
    # file (protobuf's limit is 2 GB), which a user cannot separate by mistake
    model = onnx.load(str(out))
    for key, value in (
        ("convae_part", part),
        ("classes", json.dumps(classes)),
        ("preprocessing", preprocessing(cfg)),
        ("convae_config", json.dumps(cfg.to_dict())),
    ):
        model.metadata_props.add(key=key, value=value)
    data = out.with_name(out.name + ".data")
    onnx.save(model, str(out), save_as_external_data=False)
    data.unlink(missing_ok=True)


def export_pt2(module: nn.Module, cfg: ModelConfig, part: str, out: Path, classes: list[str]) -> None:
    """A ``torch.export`` program (``torch.export.load(path).module()``), dynamic batch, with the
    class names, preprocessing and config in ``extra_files["convae.json"]``."""
    program = torch.export.export(
        module.eval(), (_example_input(cfg),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    meta = {"part": part, "classes": classes, "preprocessing": preprocessing(cfg), "config": cfg.to_dict()}
    torch.export.save(program, str(out), extra_files={"convae.json": json.dumps(meta)})


def export_torchscript(module: nn.Module, cfg: ModelConfig, out: Path) -> None:
    """A traced TorchScript module; ``torch.jit.load`` needs no convae. torch deprecates TorchScript (each of its
    calls warns): the format is still written for the runtimes that read it, without torch's warnings."""
    import warnings

    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(module, _example_input(cfg), check_trace=False)
        traced.save(str(out))


def export_safetensors(module: nn.Module, cfg: ModelConfig, part: str, out: Path, classes: list[str]) -> None:
    """Weights plus the config (in the metadata) that rebuilds the part with :func:`convae.load`."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConvaeError("safetensors export needs the safetensors package: pip install 'convae[export]'") from None
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {
        "format": SAFETENSORS_MARKER,
        "part": part,
        "config": json.dumps(cfg.to_dict()),
        "classes": json.dumps(classes),
    }
    save_file(state, str(out), metadata=meta)


def load_safetensors(path: str | Path) -> nn.Module:
    """Rebuild the part a convae safetensors file holds (its ``config`` is attached)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:
        raise ConvaeError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != SAFETENSORS_MARKER or meta.get("part") not in PARTS:
        raise ConvaeError(f"{path} is not a convae safetensors export (no convae metadata)")
    try:
        config, classes = json.loads(meta.get("config", "")), json.loads(meta.get("classes", "[]"))
    except ValueError:
        raise ConvaeError(f"{path} has damaged convae metadata (config or classes)") from None
    return rebuild(meta["part"], config, state, classes, str(path)).eval()


def export(checkpoint: str | Path, fmt: str, part: str, out: str | Path, log=lambda message: None) -> Path:
    """``convae export``: write ``part`` of ``checkpoint`` to ``out`` in ``fmt``; ``log`` says when a
    format that traces the model (seconds: no step of it reports progress) starts."""
    if fmt not in FORMATS:
        raise ConvaeError(f"the export format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if part not in PARTS:
        raise ConvaeError(f"the part must be one of {', '.join(PARTS)}; got {part!r}")
    model, payload = load_checkpoint(checkpoint)
    module = select_part(model, part, str(checkpoint))
    out = Path(out)
    if out.exists():
        raise ConvaeError(f"{out} already exists; nothing is overwritten", advice="choose a new --out file")
    make_parent(out)
    cfg, classes = model.config, payload.get("classes", [])
    # written in a private folder beside ``out`` and linked into place: never half a file under its name,
    # never over a file another export wrote meanwhile; the folders of killed exports are swept first
    remove_stale(out.parent, ".tmp-")
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=out.parent))
    try:
        tmp = work / out.name
        if fmt != "safetensors":
            log(f"exporting the {part} to {fmt}: tracing the model (seconds; torch reports no progress)")
        if fmt == "onnx":
            export_onnx(module, cfg, part, tmp, classes)
        elif fmt == "pt2":
            export_pt2(module, cfg, part, tmp, classes)
        elif fmt == "torchscript":
            export_torchscript(module, cfg, tmp)
        else:
            export_safetensors(module, cfg, part, tmp, classes)
        os.chmod(tmp, 0o666 & ~UMASK)  # the usual mode, not the private folder's
        publish(tmp, out, exclusive=True)
    except OSError as e:
        raise ConvaeError(f"could not write {out}: {e.strerror or first_line(e)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- the command


def main(checkpoint: str, fmt: str, part: str, out: str, log: Log) -> Path:
    path = export(checkpoint, fmt, part, out, log)
    log(f"wrote {part} as {fmt}: {path}")
    return path
