"""Is the learned dictionary what limits a patch network? Its filters against k-means, same probe.

Spherical k-means (Coates & Ng 2011: unit-norm centroids, each whitened patch assigned to the
centroid it has the largest dot product with) is fitted on random patches of the training
images, passed through the checkpoint's own contrast normalisation and whitening; the centroids
then replace the pretrained filters in the same encoder (same threshold, pooling and probes).
Logistic regression and kNN on every labelled training image, scored on the validation split,
for the pretrained filters, the k-means filters and random weights.

    python benchmarks/kmeans_dictionary.py --checkpoint runs/lq-patches/patches/pretrain/checkpoints/autoencoder.pt \\
        --data ../shared/data/cifar10-train-jpeg.tar.gz --json benchmarks/results/kmeans_dictionary.json

k-means is a dozen lines here rather than scikit-learn's KMeans: the spherical variant (cosine
assignment, centroids renormalised, empty clusters kept where they were) is not one it offers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_overrides, machine, print_table
from convae.config import build_config
from convae.data import to_model_input
from convae.evaluation.probes import extract_features, knn_accuracy, linear_probe_accuracy, random_encoder
from convae.models.patch import patch_stats, random_patches
from convae.outputs.checkpoint import load_checkpoint
from convae.training.rundata import prepare_data


def spherical_kmeans(z: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` unit-norm centroids (k, D) of the rows of ``z`` (N, D). Each step moves a centroid to
    the sum of its members weighted by their projection on it, plus itself (so an empty cluster
    keeps its place), and renormalises."""
    c = F.normalize(torch.randn(k, z.shape[1], generator=generator, dtype=z.dtype), dim=1)
    for _ in range(iterations):
        s = z @ c.T
        best = s.argmax(1, keepdim=True)
        assign = torch.zeros_like(s).scatter_(1, best, s.gather(1, best))
        c = F.normalize(assign.T @ z + c, dim=1)
    return c


def whitened_patches(encoder, images: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """Random patches of ``images`` as the encoder's filters see them: normalised, then whitened."""
    k = encoder.config.kernel_size
    crops = random_patches(to_model_input(images).float(), k, per_image, generator)
    mean, std = patch_stats(crops, k)
    return (((crops - mean) / std).flatten(1) - encoder.patch_mean) @ encoder.whitening


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a patch autoencoder (whitened) to compare against")
    p.add_argument("--data", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (cache_dir, ...)")
    p.add_argument("--images", type=int, default=20_000, help="training images the patches are drawn from")
    p.add_argument("--per-image", type=int, default=10, help="random patches per image")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    ae, _ = load_checkpoint(args.checkpoint, kind="autoencoder")
    enc = ae.encoder.eval()
    if ae.config.arch != "patch":
        p.error(f"{args.checkpoint} is not a patch network (arch {ae.config.arch!r})")
    cfg = build_config("patches", None, {**config_overrides(args.set), "data": args.data}).with_model(ae.config)
    data = prepare_data(cfg, need_labels=True, log=print)
    g = torch.Generator().manual_seed(args.seed)
    n = min(args.images, len(data.train))
    picked = torch.randperm(len(data.train), generator=g)[:n].sort().values
    started = time.perf_counter()
    with torch.no_grad():
        z = whitened_patches(enc, data.train.take(picked), args.per_image, g)
        centroids = spherical_kmeans(z, enc.conv.weight.shape[0], args.iterations, g)
    kmeans_s = time.perf_counter() - started
    kmeans_enc = random_encoder(ae.config, cfg.seed)
    kmeans_enc.load_state_dict(enc.state_dict())
    with torch.no_grad():
        kmeans_enc.conv.weight.copy_(centroids.view_as(enc.conv.weight))
    ytr, yva, k = data.train.labels, data.val.labels, len(data.classes)
    scores = {}
    for name, e in (("pretrained", enc), ("kmeans", kmeans_enc), ("random", random_encoder(ae.config, cfg.seed))):
        ftr, fva = (extract_features(e, x, features="pooled") for x in (data.train, data.val))
        scores[name] = {
            "logistic": linear_probe_accuracy(ftr, ytr, fva, yva, k, seed=args.seed),
            "knn": knn_accuracy(ftr, ytr, fva, yva, k),
        }
        print(f"{name}: logistic {100 * scores[name]['logistic']:.2f} %, kNN {100 * scores[name]['knn']:.2f} %")
    payload = {
        "machine": machine(),
        "checkpoint": str(args.checkpoint),
        "patches": int(z.shape[0]),
        "iterations": args.iterations,
        "kmeans_s": kmeans_s,
        "eval_set": data.eval_name,
        "scores": scores,
    }
    print(f"machine: {payload['machine']}")
    print_table(
        ["filters", "logistic (%)", "kNN (%)"],
        [[n, f"{100 * s['logistic']:.2f}", f"{100 * s['knn']:.2f}"] for n, s in scores.items()],
    )
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    main()
