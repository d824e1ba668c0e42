"""Embeddings of every image of a source (``convae encode``), a table of where they came from, and a map."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import visualise
from .checkpoint import open_model
from .config import Config
from .data import load_source, split_indices
from .device import resolve_precision
from .errors import ConvaeError
from .probes import extract_features
from .records import Log


def write_embeddings(cfg: Config, checkpoint: str, out: str, make_map: bool = True, log: Log = print) -> Path:
    """Write ``out`` (.npy, N x features float32), ``out`` with .csv (index, file, label, class, split)
    and ``figures/embedding_map.png`` beside it; ``cfg.probe_features`` picks the features."""
    out_path = Path(out)
    if out_path.suffix != ".npy":
        raise ConvaeError(f"the embeddings file must be a .npy file; got {out}")
    table = out_path.with_suffix(".csv")
    for p in (out_path, table):
        if p.exists():
            raise ConvaeError(f"{p} already exists; nothing is overwritten", advice="choose another --out")
    model, _, device = open_model(checkpoint, cfg.device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device, warn=log))
    m = model.config
    ds = load_source(cfg.data, m.in_channels, m.height, m.width, cfg.cache_dir, train=True, log=log)
    # the same seeded split as training, so a user can tell the images the model never saw
    split = np.array(["train"] * len(ds), dtype=object)
    if len(ds) >= 2:
        _, val = split_indices(ds.labels, len(ds), cfg.val_fraction, cfg.seed)
        split[val.numpy()] = "val"
    feats = extract_features(model.encoder, ds.images, batch_size=cfg.batch_size, precision=cfg.precision,
                             features=cfg.probe_features).cpu().numpy()
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
        if visualise.attempt(log, "the embedding map", lambda: visualise.save_embedding_map(
                feats, None if ds.labels is None else ds.labels.numpy(), ds.classes, fig,
                f"embeddings of {Path(cfg.data).name}", seed=cfg.seed)):
            log(f"wrote {fig}")
    return out_path
