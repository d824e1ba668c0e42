"""Embeddings of every image of a source (``convae encode``), a table of where they came from, and a map."""

from __future__ import annotations

import csv
import io
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import visualise
from .checkpoint import open_model
from .config import Config
from .data import load_source, split_indices
from .device import resolve_precision
from .errors import ConvaeError
from .files import atomic_write, atomic_write_text
from .probes import feature_chunks
from .records import Log


def write_embeddings(cfg: Config, checkpoint: str, out: str, make_map: bool = True, log: Log = print) -> Path:
    """Write ``out`` (.npy, N x features float32), ``out`` with .csv (index, file, label, class, split)
    and the t-SNE map as ``out`` with ``_map.png``; ``cfg.probe_features`` picks the features.

    The ``split`` column (train/val, the training run's seeded split) is filled only when
    ``cfg.data`` is the source the checkpoint was trained on; for any other source it is empty.
    """
    out_path = Path(out)
    if out_path.suffix != ".npy":
        raise ConvaeError(f"the embeddings file must be a .npy file; got {out}")
    table = out_path.with_suffix(".csv")
    fig = out_path.with_name(out_path.stem + "_map.png")
    for p in (out_path, table) + ((fig,) if make_map else ()):
        if p.exists():
            raise ConvaeError(f"{p} already exists; nothing is overwritten", advice="choose another --out")
    model, payload, device = open_model(checkpoint, cfg.device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device, warn=log))
    m = model.config
    ds = load_source(cfg.data, m.in_channels, m.height, m.width, cfg.cache_dir, train=True, log=log,
                     workers=cfg.workers)
    # the training run's seeded split, so a user can tell the images the model never saw
    split = np.array([""] * len(ds), dtype=object)
    trained_on = (payload.get("run_config") or {}).get("data")
    if len(ds) >= 2 and trained_on is not None and str(trained_on) == str(cfg.data):
        split[:] = "train"
        _, val = split_indices(ds.labels, len(ds), cfg.val_fraction, cfg.seed)
        split[val.numpy()] = "val"
    # written chunk by chunk: the features of a big source are never all in memory
    chunks = feature_chunks(model.encoder, ds, batch_size=cfg.batch_size, precision=cfg.precision,
                            features=cfg.probe_features)
    first = next(chunks)

    def write(f) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (len(ds), first.shape[1])}
        np.lib.format.write_array_header_1_0(f, header)
        for c in itertools.chain([first], chunks):
            f.write(c.cpu().numpy().astype(np.float32, copy=False).tobytes())

    atomic_write(out_path, write)
    feats = np.load(out_path, mmap_mode="r")
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["index", "file", "label", "class", "split"])
    for i in range(len(ds)):
        label = "" if ds.labels is None else int(ds.labels[i])
        name = "" if ds.labels is None else ds.classes[int(ds.labels[i])]
        w.writerow([i, ds.files[i] if ds.files else "", label, name, split[i]])
    atomic_write_text(table, rows.getvalue())
    log(f"wrote {feats.shape[0]} x {feats.shape[1]} embeddings to {out_path} and their sources to {table}")
    if make_map:
        if visualise.attempt(log, "the embedding map", lambda: visualise.save_embedding_map(
                feats, None if ds.labels is None else ds.labels.numpy(), ds.classes, fig,
                f"embeddings of {Path(cfg.data).name}", seed=cfg.seed)):
            log(f"wrote {fig}")
    return out_path
