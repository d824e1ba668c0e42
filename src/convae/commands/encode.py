"""Embeddings of every image of a source (``convae encode``), a table of where they came from, and a map."""

from __future__ import annotations

import csv
import io
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import INFERENCE_BATCH_SIZE, Config, build_config
from ..data import load_source, split_indices
from ..evaluation.probes import feature_chunks
from ..outputs import figures
from ..outputs.checkpoint import open_model
from ..utils.errors import ConvaeError
from ..utils.files import atomic_write, atomic_write_text
from ..utils.records import Log


def cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: a leading = + - @ (a formula to Excel and LibreOffice)
    is quoted with an apostrophe, as OWASP advises for CSV injection."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def same_source(trained: str, given: str) -> bool:
    """Whether ``given`` names the source the run was trained on: the same spelling, or the same file or
    folder by another (an absolute path for a relative one, read from here)."""
    if trained == given:
        return True
    try:
        return Path(trained).exists() and Path(given).exists() and os.path.samefile(trained, given)
    except OSError:
        return False


def training_split(run: dict, cfg: Config, ds, given: set[str]) -> np.ndarray:
    """The train/val column: the training run's seeded split (its ``val_fraction`` and ``seed``, unless
    given here), so a user can tell the images the model never saw; all ``train`` when the run
    evaluated on separate test data; empty for a source the run did not train on."""
    split = np.array([""] * len(ds), dtype=object)
    if len(ds) < 2 or run.get("data") is None or not same_source(str(run["data"]), str(cfg.data)):
        return split
    split[:] = "train"
    if run.get("test_data"):
        return split
    fraction = cfg.val_fraction if "val_fraction" in given else run.get("val_fraction", cfg.val_fraction)
    seed = cfg.seed if "seed" in given else run.get("seed", cfg.seed)
    try:
        _, val = split_indices(ds.labels, len(ds), float(fraction), int(seed))
    except (TypeError, ValueError):  # a run config edited by hand: the column stays as the flags say
        _, val = split_indices(ds.labels, len(ds), cfg.val_fraction, cfg.seed)
    split[val.numpy()] = "val"
    return split


def write_embeddings(
    cfg: Config, checkpoint: str, out: str, make_map: bool = True, log: Log = print, given: set[str] = frozenset()
) -> Path:
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
    cfg = cfg.for_device(device, log)
    m = model.config
    ds = load_source(
        cfg.data, m.in_channels, m.height, m.width, cfg.cache_dir, train=True, log=log, workers=cfg.workers
    )
    split = training_split(payload.get("run_config") or {}, cfg, ds, given)
    # written chunk by chunk: the features of a big source are never all in memory
    log(f"encoding {len(ds)} images ({cfg.probe_features} features)")
    chunks = feature_chunks(
        model.encoder,
        ds,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
        features=cfg.probe_features,
        desc="encoding",
    )
    first = next(chunks)

    def write(f) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": (len(ds), first.shape[1]),
        }
        np.lib.format.write_array_header_1_0(f, header)
        for c in itertools.chain([first], chunks):
            f.write(c.cpu().numpy().astype(np.float32, copy=False).tobytes())

    atomic_write(out_path, write, exclusive=True)
    feats = np.load(out_path, mmap_mode="r")
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["index", "file", "label", "class", "split"])
    for i in range(len(ds)):
        label = "" if ds.labels is None else int(ds.labels[i])
        name = "" if ds.labels is None else ds.classes[int(ds.labels[i])]
        w.writerow([i, cell(ds.files[i] if ds.files else ""), label, cell(name), split[i]])
    try:
        atomic_write_text(table, rows.getvalue(), exclusive=True)
    except (ConvaeError, OSError):  # a full disk: the features without their sources are taken back, so a retry
        del feats  # can write both (the .npy would refuse it as "already exists")
        out_path.unlink(missing_ok=True)
        raise
    log(f"wrote {feats.shape[0]} x {feats.shape[1]} embeddings to {out_path} and their sources to {table}")
    if make_map:
        log(f"drawing the t-SNE map of {min(3000, len(ds))} images")
        if figures.attempt(
            log,
            "the embedding map",
            lambda: figures.save_embedding_map(
                feats,
                None if ds.labels is None else ds.labels.numpy(),
                ds.classes,
                fig,
                f"embeddings of {Path(cfg.data).name}",
                seed=cfg.seed,
            ),
        ):
            log(f"wrote {fig}")
    return out_path


# ----------------------------------------------------------------------------- the command


def main(overrides: dict[str, Any], checkpoint: str, out: str, make_map: bool, log: Log) -> Path:
    """``convae encode``: the seed preset's data settings, INFERENCE_BATCH_SIZE images per pass."""
    given = set(overrides)
    overrides = {"batch_size": INFERENCE_BATCH_SIZE, **overrides}
    return write_embeddings(
        build_config("seed", None, overrides), checkpoint, out, make_map=make_map, log=log, given=given
    )
