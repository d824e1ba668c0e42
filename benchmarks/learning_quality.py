"""Does pretraining pay? One table per recipe, measured with convae's own protocol.

For every preset named (a pretraining recipe: objective, architecture, augmentation), this
pretrains once through convae's pipeline (wall time measured), then runs ``convae sweep``'s
protocol on that checkpoint: for every label budget and seed, the pretrained encoder fine-tuned
and the same network from scratch (same recipe, same augmentation), the frozen features scored
by logistic regression and kNN, and the same architecture with random weights through the same
probes. Both feature kinds (the FC latent and the pooled conv stages) are probed with every
labelled training image. Evaluation: the stratified validation split of ``--data``.

    python benchmarks/learning_quality.py --data ../shared/data/cifar10-train-jpeg.tar.gz \\
        --presets masked --out runs/lq --json benchmarks/results/learning_quality.json

Prints the table (mean +- std over seeds, %) and writes JSON; the machine is named in both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_overrides, machine, print_table
from convae.commands.run import run_training
from convae.commands.sweep import parse_budgets, run_sweep
from convae.config import SWEEP_BATCH_SIZE, build_config
from convae.data import per_class_subset
from convae.evaluation.probes import extract_features, knn_accuracy, linear_probe_accuracy, random_encoder
from convae.outputs.checkpoint import load_checkpoint
from convae.training.rundata import prepare_data


def feature_kinds(cfg) -> tuple[str, ...]:
    """The patch architecture's features are pooled conv features already: one kind, not two."""
    return ("pooled",) if cfg.arch == "patch" else ("latent", "pooled")


def probes_all_labels(cfg, checkpoint: Path, log, budgets: list[int] = (), seeds: int = 3) -> dict:
    """Logistic and kNN on latent and pooled features, every labelled training image as the bank;
    with ``budgets`` also on that many labelled images per class (``seeds`` seeded subsets each).

    For a whitened patch encoder also random filters behind the fitted whitening: how much of
    the gain over random weights the whitening alone gives.
    """
    ae, _ = load_checkpoint(checkpoint, kind="autoencoder")
    data = prepare_data(cfg, need_labels=True, log=log)
    ytr, yva, k = data.train.labels, data.val.labels, len(data.classes)
    encoders = {"pretrained": ae.encoder, "random": random_encoder(ae.config, cfg.seed)}
    if cfg.arch == "patch" and cfg.whiten:
        whitened = random_encoder(ae.config, cfg.seed)
        whitened.patch_mean.copy_(ae.encoder.patch_mean)
        whitened.whitening.copy_(ae.encoder.whitening)
        encoders["random_filters_whitened"] = whitened
    out = {}
    for features in feature_kinds(cfg):
        out[features] = {}
        for name, enc in encoders.items():
            if name == "random_filters_whitened" and features != "pooled":
                continue
            ftr, fva = (
                extract_features(enc, x, precision=cfg.precision, features=features) for x in (data.train, data.val)
            )
            r = {
                "logistic": linear_probe_accuracy(ftr, ytr, fva, yva, k, seed=cfg.seed),
                "knn": knn_accuracy(ftr, ytr, fva, yva, k),
            }
            for budget in budgets:
                cells = [per_class_subset(ytr, torch.arange(len(ytr)), budget, cfg.seed + i) for i in range(seeds)]
                r.setdefault("budgets", {})[str(budget)] = {
                    "logistic": [
                        linear_probe_accuracy(ftr[i], ytr[i], fva, yva, k, seed=cfg.seed + s)
                        for s, i in enumerate(cells)
                    ],
                    "knn": [knn_accuracy(ftr[i], ytr[i], fva, yva, k) for i in cells],
                }
            out[features][name] = r
            log(
                f"probes: {features} features, {name}: logistic {100 * r['logistic']:.2f} %, kNN {100 * r['knn']:.2f} %"
            )
    return out


def probe_rows(spec: str, probes: dict, budgets: list[int], pretrain_s: float | None) -> list[list[str]]:
    """One table row per feature kind and weights: mean +- std over the seeds at each budget, then all labels."""

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"

    rows = []
    for features, by_weights in probes.items():
        for weights, r in by_weights.items():
            cells = [f"{ms(r['budgets'][str(b)]['logistic'])} / {ms(r['budgets'][str(b)]['knn'])}" for b in budgets]
            rows.append(
                [
                    spec,
                    f"{features}: {weights}",
                    *cells,
                    f"{100 * r['logistic']:.2f} / {100 * r['knn']:.2f}",
                    "" if pretrain_s is None else f"{pretrain_s:.0f} s",
                ]
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument(
        "--presets",
        nargs="+",
        required=True,
        metavar="PRESET[:KEY=VALUE,...]",
        help="pretraining recipes: convae presets, each optionally with its own config keys (denoise:objective=masked)",
    )
    p.add_argument(
        "--probes-only",
        action="store_true",
        help="pretrain and probe (latent and pooled, pretrained and random; all labels, and logistic "
        "regression and kNN at each numeric --budgets over --seeds subsets); no fine-tuning",
    )
    p.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="with --probes-only and one preset: probe this "
        "autoencoder (pretrained with that preset) instead of pretraining again",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys for every preset")
    p.add_argument("--budgets", nargs="+", default=["25", "100", "400", "all"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sweep-batch-size", type=int, default=SWEEP_BATCH_SIZE)
    p.add_argument("--out", required=True, help="folder for the runs (one pretraining and one sweep per preset)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    if args.checkpoint and not (args.probes_only and len(args.presets) == 1):
        p.error("--checkpoint probes that autoencoder: it needs --probes-only and exactly one preset")

    log = print
    extra = config_overrides(args.set)
    info = machine()
    print(f"machine: {info}")
    rows, results = [], []
    for spec in args.presets:
        preset, _, own = spec.partition(":")
        own_keys = config_overrides(kv for kv in own.split(",") if kv)
        base = build_config(preset, None, {"data": args.data, **extra, **own_keys})
        out = Path(args.out) / spec.replace(":", "_").replace(",", "_").replace("=", "-")
        if args.checkpoint and args.probes_only and len(args.presets) == 1:
            ckpt, pretrain_s = Path(args.checkpoint), None
        else:
            start = time.perf_counter()
            run_training(replace(base, out=str(out / "pretrain")), phases=("pretrain",), log=log)
            pretrain_s = time.perf_counter() - start
            ckpt = out / "pretrain" / "checkpoints" / "autoencoder.pt"
        budgets = [b for b in parse_budgets(args.budgets) if b is not None] if args.probes_only else []
        probes = probes_all_labels(base, ckpt, log, budgets, args.seeds)
        row = {
            "preset": spec,
            "config": base.to_dict(),
            "checkpoint": str(ckpt),
            "pretrain_s": pretrain_s,
            "probes_all_labels": probes,
        }
        results.append(row)
        if args.probes_only:
            rows += probe_rows(spec, probes, budgets, pretrain_s)
            continue
        sweep_cfg = replace(base, out=str(out / "sweep"), batch_size=args.sweep_batch_size)
        run_sweep(sweep_cfg, parse_budgets(args.budgets), args.seeds, args.steps, str(ckpt), log=log)
        sweep = json.loads((out / "sweep" / "sweep.json").read_text())
        cell = {(r["method"], str(r["labels_per_class"])): r for r in sweep["summary"]}
        row.update({"summary": sweep["summary"], "cells": sweep["cells"]})

        def ms(method, budget):
            r = cell.get((method, str(budget)))
            return f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" if r else ""

        for method in ("finetune", "scratch", "logistic_probe", "logistic_random", "knn", "knn_random"):
            rows.append(
                [spec if method == "finetune" else "", sweep["methods"][method]]
                + [ms(method, b) for b in sweep["budgets"]]
            )
        for features in feature_kinds(base):
            pr = probes[features]
            rows.append(
                [
                    "",
                    f"{features} features, all labels: logistic / kNN",
                    f"pretrained {100 * pr['pretrained']['logistic']:.2f} / {100 * pr['pretrained']['knn']:.2f}",
                    f"random {100 * pr['random']['logistic']:.2f} / {100 * pr['random']['knn']:.2f}",
                    "",
                    "",
                ]
            )
        rows.append(["", f"pretraining wall time: {pretrain_s:.0f} s", "", "", "", ""])
    headers = (
        ["recipe", "features: weights"]
        + [f"{b}/class: logistic / kNN" for b in budgets]
        + ["all: logistic / kNN", "pretraining"]
        if args.probes_only
        else ["preset", "method"] + [f"{b}/class" for b in args.budgets]
    )
    print_table(headers, [r[: len(headers)] + [""] * (len(headers) - len(r)) for r in rows])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {"machine": info, "seeds": args.seeds, "steps": args.steps, "budgets": args.budgets, "results": results},
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
