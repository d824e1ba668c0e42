"""The FLOP limit: how close convae's training comes to what the machine's matrix units can do.

    python benchmarks/flops.py [--device cpu|cuda] [--preset seed|blocks|...] [--batch-size N] [--steps 5]
                               [--data random|ARCHIVE]

Counts the preset's model's training FLOPs per image (default: the seed model) (forward + backward,
torch.utils.flop_counter:
convolutions and matrix products) and its encoder's inference FLOPs (the features the probes read), measures
the machine's sustained matrix-product FLOP/s in
float32 and bfloat16 in the same run, and prints convae's measured throughput as a fraction of
the limit those give (limit = FLOP/s / FLOPs per image), for training and for feature
extraction. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_images, print_table, sync, write_json
from convae.config import build_config
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
