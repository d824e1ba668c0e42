"""The FLOP limit: how close convae's training comes to what the machine's matrix units can do.

    python benchmarks/flops.py [--device cpu|cuda] [--preset seed|blocks|...] [--batch-size N] [--steps 5]
                               [--data random|ARCHIVE]

Counts the preset's model's training FLOPs per image (default: the seed model) (forward + backward,
torch.utils.flop_counter:
convolutions and matrix products) and its encoder's inference FLOPs (the features the probes read), measures
the machine's sustained matrix-product FLOP/s in
float32 and bfloat16 in the same run, and prints convae's measured throughput as a fraction of
the limit those give (limit = FLOP/s / FLOPs per image), for training and for feature
extraction. A preset that trains with consistency training (``--joint fixmatch|flexmatch|freematch``: the
``few`` preset) also has its step measured: the weak views' forward without autograd, then the labelled and the
strong views' forward and backward, every strong view computed (a threshold every prediction passes: the most
work a step does), its FLOPs counted per image read (labelled and unlabelled) and its peak memory. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_images, print_table, sync, write_json
from convae.config import build_config
from convae.config.modes import training_mode
from convae.evaluation.probes import extract_features
from convae.models import AutoEncoder, Classifier, ModelConfig
from convae.models.objectives import ObjectiveConfig, make_objective
from convae.utils import heap
from convae.utils.device import bf16_is_fast, device_name
from convae.utils.records import Batch
from train_throughput import convae_loop


def training_flops_per_image(
    phase: str, batch: int = 8, cfg: ModelConfig | None = None, objective: ObjectiveConfig | None = None
) -> float:
    cfg = cfg or ModelConfig()
    model = AutoEncoder(cfg) if phase == "pretrain" else Classifier(cfg)
    if phase == "pretrain" and hasattr(model.decoder, "fuse_upsample"):
        # count the model's own work (upsample, then the 3x3 conv); the fused CPU path computes
        # the same function and is what the throughput measures
        model.decoder.fuse_upsample = False
    x = torch.rand(batch, cfg.in_channels, cfg.height, cfg.width)
    with FlopCounterMode(display=False) as counter:
        if phase == "pretrain":
            loss = make_objective(objective or ObjectiveConfig())(model, Batch(x), torch.Generator().manual_seed(0))
        else:
            loss = F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long))
        loss.backward()
    return counter.get_total_flops() / batch


def consistency_step(run_cfg, images, labels, device, precision: str, warmup: int, steps: int) -> dict:
    """One consistency-training step of ``run_cfg`` (its mode, batch and ratio; every strong view computed) on
    ``images``: its FLOPs per image read, images read per second over ``steps`` steps after ``warmup``, and its
    peak memory (CUDA: allocated; CPU: the process's resident set)."""
    from _common import PeakRSS
    from convae.config.modes import training_mode
    from convae.data import ImageSet, per_class_subset
    from convae.training.loop import StepSettings, train_one_epoch

    cfg = replace(run_cfg, consistency_threshold=1e-9, precision=precision)
    torch.manual_seed(0)
    clf = Classifier(cfg.model_config(int(labels.max()) + 1)).to(device, memory_format=torch.channels_last)
    every = ImageSet(images, labels, [str(c) for c in range(int(labels.max()) + 1)], [])
    k = len(every.classes)  # a few labelled images of every class
    labelled = every.subset(per_class_subset(labels, torch.arange(len(labels)), max(1, 4 * cfg.batch_size // k), 0))
    model, batches, criterion, side = training_mode(cfg.joint).build(
        clf, labelled, every, every.classes, cfg, device, cfg.seed
    )
    per_step = cfg.batch_size * (1 + cfg.unlabelled_ratio)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    settings = StepSettings(precision=precision, seed=0)
    x, idx = next(iter(batches))
    lx, ly = next(side(0))
    with FlopCounterMode(display=False) as counter:
        criterion(model, Batch(x, idx, Batch(lx, ly)), torch.Generator(device=device).manual_seed(0))["loss"].backward()
    flops = counter.get_total_flops() / per_step
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches.set_epoch(1)
    train_one_epoch(model, batches, opt, criterion, settings, max_steps=warmup, labelled=side(0))
    with PeakRSS() as rss:
        sync(device)
        start = time.perf_counter()
        train_one_epoch(model, batches, opt, criterion, settings, max_steps=steps, labelled=side(warmup))
        sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.peak
    return {"flops_per_image": flops, "images_per_s": per_step * steps / seconds, "peak_mib": peak}


def inference_flops_per_image(cfg: ModelConfig, features: str, batch: int = 8) -> float:
    """FLOPs of the encoder's features for one image, as the probes and ``encode`` read them."""
    enc = Classifier(cfg).encoder.eval()
    x = torch.rand(batch, cfg.in_channels, cfg.height, cfg.width)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        enc.forward_pooled(x) if features == "pooled" else enc(x)
    return counter.get_total_flops() / batch


def inference_rate(
    cfg: ModelConfig, features: str, images: torch.Tensor, device, precision: str, rounds: int = 3
) -> float:
    """Images/s of feature extraction (extract_features, as the probes run it), the best of ``rounds``."""
    torch.manual_seed(0)
    enc = Classifier(cfg).encoder.to(device, memory_format=torch.channels_last).eval()
    extract_features(enc, images[:256], precision=precision, features=features)  # warm-up
    best = 0.0
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        extract_features(enc, images, precision=precision, features=features)
        sync(device)
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def matmul_flops(dtype: torch.dtype, device: torch.device, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of square matrix products (the best of the timed repetitions)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default="random")
    p.add_argument("--cache-dir", default="~/.cache/convae")
    p.add_argument("--preset", default="seed", help="whose model and pretraining objective (default seed)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--inference-images", type=int, default=2000, help="images whose features are timed")
    p.add_argument("--json", help="output file (default benchmarks/results/flops.json)")
    args = p.parse_args(argv)
    # the heap as the convae command keeps it (freed activations reused, not faulted in again)
    kept = heap.keep_freed_memory()
    device = torch.device(args.device)
    run_cfg = build_config(args.preset)
    mcfg, objective = run_cfg.model_config(), run_cfg.objective_config()
    args.batch_size = args.batch_size or run_cfg.batch_size
    # bf16 only where the hardware has it: emulated, one matrix product takes a minute (AVX2 CPUs)
    precisions = ("fp32", "bf16") if bf16_is_fast(device) else ("fp32",)
    if len(precisions) == 1:
        print(f"bf16 is not measured: {device_name(device)} has no bf16 in hardware")
    peak = {p: matmul_flops(torch.float32 if p == "fp32" else torch.bfloat16, device) for p in precisions}
    need = max(args.batch_size * (args.warmup + args.steps), args.inference_images)
    need = max(need, args.batch_size * run_cfg.unlabelled_ratio * (args.warmup + args.steps + 1))
    images, labels = load_images(args.data, need if args.data == "random" else None, args.cache_dir)
    rows, out = [], []
    for phase in ("pretrain", "finetune"):
        per_image = training_flops_per_image(phase, cfg=mcfg, objective=objective)
        for prec in precisions:
            limit = peak[prec] / per_image
            ips = convae_loop(
                phase,
                images,
                labels,
                args.batch_size,
                args.warmup,
                args.steps,
                device,
                prec,
                cfg=mcfg,
                objective=objective,
            )
            rows.append(
                [
                    phase,
                    prec,
                    f"{per_image / 1e6:.1f}",
                    f"{peak[prec] / 1e9:.0f}",
                    f"{limit:.0f}",
                    f"{ips:.0f}",
                    f"{100 * ips / limit:.0f}%",
                ]
            )
            out.append(
                {
                    "phase": phase,
                    "precision": prec,
                    "train_flops_per_image": per_image,
                    "matmul_flops_per_s": peak[prec],
                    "limit_images_per_s": limit,
                    "images_per_s": ips,
                    "fraction_of_limit": ips / limit,
                }
            )
    if training_mode(run_cfg.joint).name in ("fixmatch", "flexmatch", "freematch"):
        for prec in precisions:
            step = consistency_step(
                replace(run_cfg, batch_size=args.batch_size), images, labels, device, prec, args.warmup, args.steps
            )
            limit = peak[prec] / step["flops_per_image"]
            name = f"{run_cfg.joint} step"
            rows.append(
                [
                    name,
                    prec,
                    f"{step['flops_per_image'] / 1e6:.1f}",
                    f"{peak[prec] / 1e9:.0f}",
                    f"{limit:.0f}",
                    f"{step['images_per_s']:.0f}",
                    f"{100 * step['images_per_s'] / limit:.0f}%",
                ]
            )
            out.append(
                {
                    "phase": name,
                    "precision": prec,
                    "train_flops_per_image": step["flops_per_image"],
                    "matmul_flops_per_s": peak[prec],
                    "limit_images_per_s": limit,
                    "images_per_s": step["images_per_s"],
                    "fraction_of_limit": step["images_per_s"] / limit,
                    "peak_mib": step["peak_mib"],
                    "images_per_step": args.batch_size * (1 + run_cfg.unlabelled_ratio),
                }
            )
    per_image = inference_flops_per_image(mcfg, run_cfg.probe_features)
    sample = images[: args.inference_images]
    for prec in precisions:
        limit = peak[prec] / per_image
        ips = inference_rate(mcfg, run_cfg.probe_features, sample, device, prec)
        rows.append(
            [
                f"features ({run_cfg.probe_features})",
                prec,
                f"{per_image / 1e6:.1f}",
                f"{peak[prec] / 1e9:.0f}",
                f"{limit:.0f}",
                f"{ips:.0f}",
                f"{100 * ips / limit:.0f}%",
            ]
        )
        out.append(
            {
                "phase": "features",
                "features": run_cfg.probe_features,
                "precision": prec,
                "flops_per_image": per_image,
                "matmul_flops_per_s": peak[prec],
                "limit_images_per_s": limit,
                "images_per_s": ips,
                "fraction_of_limit": ips / limit,
            }
        )
    print_table(
        ["phase", "precision", "MFLOP/image", "matmul GFLOP/s", "limit img/s", "convae img/s", "of limit"], rows
    )
    return write_json(
        args.json, "flops.json", {"args": vars(args), "device": device_name(device), "heap_kept": kept, "results": out}
    )


if __name__ == "__main__":
    main()
