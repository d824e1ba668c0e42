"""``convae encode``: embeddings of every image of a source, a table of where they came from, and a map."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import visualise
from .checkpoint import load_checkpoint
from .config import Config
from .data import load_source, split_indices
from .device import resolve_device
from .errors import ConvaeError
from .probes import extract_features


def main(cfg: Config, checkpoint: str, out: str, make_map: bool = True, log: Callable[[str], None] = print) -> Path:
    """Write ``out`` (.npy, N x latent float32), ``out`` with .csv (index, file, label, class, split)
    and ``figures/embedding_map.png`` beside it."""
    out_path = Path(out)
    if out_path.suffix != ".npy":
        raise ConvaeError(f"--out must name a .npy file; got {out}")
    table = out_path.with_suffix(".csv")
    for p in (out_path, table):
        if p.exists():
            raise ConvaeError(f"{p} already exists; choose another --out")
    model, _ = load_checkpoint(checkpoint)
    m = model.config
    device = resolve_device(cfg.device)
    ds = load_source(cfg.data, m.in_channels, m.height, m.width, cfg.cache_dir, train=True, log=log)
    # the same seeded split as training, so a user can tell the images the model never saw
    split = np.array(["train"] * len(ds), dtype=object)
    if len(ds) >= 2:
        _, val = split_indices(ds.labels, len(ds), cfg.val_fraction, cfg.seed)
        split[val.numpy()] = "val"
    encoder = model.encoder.to(device, memory_format=torch.channels_last)
    feats = extract_features(encoder, ds.images, batch_size=cfg.batch_size, precision=cfg.precision).cpu().numpy()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, feats.astype(np.float32))
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "label", "class", "split"])
        for i in range(len(ds)):
            label = "" if ds.labels is None else int(ds.labels[i])
            name = "" if ds.labels is None else ds.classes[int(ds.labels[i])]
            w.writerow([i, ds.files[i] if ds.files else "", label, name, split[i]])
    log(f"wrote {feats.shape[0]} x {feats.shape[1]} embeddings to {out_path} and their sources to {table}")
    if make_map:
        fig = out_path.parent / "figures" / "embedding_map.png"
        visualise.save_embedding_map(feats, None if ds.labels is None else ds.labels.numpy(), ds.classes, fig,
                                     f"embeddings of {Path(cfg.data).name}", seed=cfg.seed)
        log(f"wrote {fig}")
    return out_path
