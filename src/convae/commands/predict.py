"""``convae predict``: class and probabilities for image files, preprocessed as in training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import INFERENCE_BATCH_SIZE
from ..data import is_image_file, load_image, to_model_input
from ..data.images import printable
from ..outputs.checkpoint import open_model
from ..utils.errors import ConvaeError, first_line
from ..utils.records import Log


def collect_images(paths: list[str]) -> list[Path]:
    """Files as given, and every image under each folder (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise ConvaeError(f"no images found in {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ConvaeError(f"image or folder not found: {p}")
    return files


def predict(
    checkpoint: str | Path,
    paths: list[str],
    device: str = "auto",
    batch_size: int = INFERENCE_BATCH_SIZE,
    warn: Callable[[str], None] = print,
) -> list[dict]:
    """One dict per readable image: ``file``, ``class``, ``probability`` and ``probabilities`` per class."""
    if batch_size <= 0:
        raise ConvaeError(f"batch_size must be an integer > 0, got {batch_size}")
    clf, payload, dev = open_model(checkpoint, device, kind="classifier")
    cfg = clf.config
    classes = payload.get("classes") or [str(i) for i in range(cfg.num_classes)]
    files = collect_images(paths)
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):  # decoded a batch at a time: a big folder is never all in memory
        images, names = [], []
        for f in files[start : start + batch_size]:
            try:
                img, _, _ = load_image(f, cfg.in_channels, cfg.height, cfg.width)
            except Exception as e:
                warn(f"skipped {printable(f)}: {printable(first_line(e, 300))}")
                continue
            images.append(img)
            names.append(str(f))
        if not images:
            continue
        with torch.no_grad():
            probs = torch.softmax(clf(to_model_input(torch.stack(images).to(dev))).float(), 1).cpu()
        for name, p in zip(names, probs):
            k = int(p.argmax())
            rows.append(
                {
                    "file": name,
                    "class": classes[k],
                    "probability": float(p[k]),
                    "probabilities": {c: float(v) for c, v in zip(classes, p)},
                }
            )
    if not rows:
        raise ConvaeError("none of the given files could be read as an image")
    return rows


def format_predictions(rows: list[dict], as_json: bool = False, top: int = 3) -> str:
    if as_json:
        return json.dumps(rows, indent=2)
    # one row per image whatever a name holds: newlines, control characters and bad bytes escaped
    names = [printable(r["file"]) for r in rows]
    width = max(4, *(len(n) for n in names))
    lines = [f"{'file':<{width}}  {'class':<12}  prob    next best"]
    for r, name in zip(rows, names):
        ranked = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[1:top]
        nxt = ", ".join(f"{printable(c)} {p:.2f}" for c, p in ranked)
        lines.append(f"{name:<{width}}  {printable(r['class']):<12}  {r['probability']:.3f}   {nxt}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def main(
    checkpoint: str,
    images: list[str],
    device: str,
    batch_size: int,
    as_json: bool,
    log: Log,
    warn: Callable[[str], None],
) -> None:
    rows = predict(checkpoint, images, device, batch_size, warn=warn)
    log(format_predictions(rows, as_json=as_json))
