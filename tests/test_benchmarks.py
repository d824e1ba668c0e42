"""The benchmark scripts run as a user runs them, at toy sizes, and write what BENCHMARKS.md quotes.

No timing is asserted (speed is measured by the scripts, not by tests): only that each script
finishes, writes its JSON, and that the quantities that do not depend on the machine are right.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convae.utils import heap

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, cwd: Path) -> dict:
    out = cwd / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), *args, "--json", str(out)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_fused_layer_benchmark(tmp_path):
    res = run_script(
        "fused_layer", "--batch", "4", "--steps", "1", "--rounds", "1", "--precision", "fp32", cwd=tmp_path
    )["results"]
    assert [(r["in"], r["out"]) for r in res][:2] == [(64, 3), (64, 8)]
    # the table's last column is what the decoder really does
    assert [r["decoder_uses"] for r in res] == ["fused", "fused", "plain", "plain", "plain", "plain"]
    assert all(r["speedup"] > 0 and len(r["plain_ms"]) == 1 for r in res)


def test_flops_benchmark_measures_the_consistency_step_of_the_few_preset(tmp_path):
    payload = run_script(
        "flops", "--preset", "few", "--data", "random", "--batch-size", "4", "--warmup", "1", "--steps", "1",
        "--inference-images", "16", cwd=tmp_path,
    )  # fmt: skip
    rows = {r["phase"]: r for r in payload["results"]}
    step, tune = rows["fixmatch step"], rows["finetune"]
    assert step["images_per_step"] == 4 * 4 and step["peak_mib"] > 50 and step["images_per_s"] > 0
    # per image read: the labelled and strong views trained (a fine-tuning image's cost), the weak ones only
    # forward (about a third of it): 3/4 of the images at (1 + 1/3), 1/4 at 1
    assert tune["train_flops_per_image"] < step["train_flops_per_image"] < 1.34 * tune["train_flops_per_image"]


def test_strong_augment_benchmark_times_convae_against_torchvision(tmp_path):
    res = run_script("strong_augment", "--batch", "6", "--size", "16", "--rounds", "1", cwd=tmp_path)
    rates = res["images_per_s"]
    assert len(rates) == 3 and all(r > 0 for r in rates.values())
    assert next(iter(rates)).startswith("convae") and res["machine"]["cpu"]


def test_train_throughput_benchmark_measures_every_loop(tmp_path):
    payload = run_script(
        "train_throughput",
        "--data",
        "random",
        "--batch-size",
        "16",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--phases",
        "pretrain",
        "--precision",
        "fp32",
        "--plain",
        "--workers",
        "0",
        cwd=tmp_path,
    )
    rows = {(r["loop"], r["micro_batch"]): r for r in payload["results"]}
    assert set(rows) == {("lecture", None), ("convae", 200), ("plain", 200)}
    assert rows[("lecture", None)]["ratio_vs_lecture"] == pytest.approx(1.0)
    assert all(r["images_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows.values())


def test_busy_machine_benchmark_measures_every_arm_alone_and_beside_a_competitor(tmp_path):
    payload = run_script(
        "busy_machine",
        "--batch-size",
        "16",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--settle",
        "0.1",
        cwd=tmp_path,
    )
    rows = {(r["arm"], r["beside"]): r for r in payload["results"]}
    assert set(rows) == {(a, b) for a in ("lecture", "fixed", "follows") for b in ("alone", "loop")}
    assert all(r["ratio_vs_alone"] == pytest.approx(1.0) for (_, b), r in rows.items() if b == "alone")
    assert all(r["images_per_s"] > 0 and r["threads_at_end"] >= 1 for r in rows.values())
    assert payload["cpu"] and payload["precision"] == "fp32"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="samples memory from Linux's /proc")
def test_run_memory_benchmark_measures_whole_runs_from_a_folder_it_writes(tmp_path):
    payload = run_script(
        "run_memory", "--gb", "0.0005", "--size", "16", "--commands", "pretrain", "--dir", str(tmp_path), cwd=tmp_path
    )
    (size,) = payload["results"]
    assert size["images"] == 0.0005 * 2**30 // (3 * 16 * 16)
    runs = size["runs"]
    assert list(runs) == ["pretrain, decoding", "pretrain, from the cache"]
    for r in runs.values():
        assert r["peak_anon_mib"] > 50 and r["seconds"] > 0  # torch alone is more than 50 MiB
        assert "done:" in " ".join(r["log_tail"])


def test_flops_benchmark_counts_the_models_training_flops(tmp_path):
    payload = run_script(
        "flops",
        "--data",
        "random",
        "--batch-size",
        "16",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--inference-images",
        "32",
        cwd=tmp_path,
    )
    res = payload["results"]
    assert payload["heap_kept"] == heap.glibc()  # measured with the heap the convae command runs with
    per_image = {r["phase"]: r.get("train_flops_per_image", r.get("flops_per_image")) / 1e6 for r in res}
    # the seed autoencoder, forward + backward (no input gradient for the image)
    assert per_image["pretrain"] == pytest.approx(179.1, abs=0.05)
    assert per_image["finetune"] == pytest.approx(56.9, abs=0.05)
    # its encoder's features, forward only: about a third of the classifier's training step
    assert per_image["features"] == pytest.approx(19.2, abs=0.05)
    assert all(r["images_per_s"] > 0 and r["limit_images_per_s"] > 0 for r in res)


def test_end_to_end_benchmark_runs_convae(tmp_path, image_folder):
    payload = run_script(
        "end_to_end",
        "--data",
        str(image_folder),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--pretrain-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--skip-reference",
        cwd=tmp_path,
    )
    (convae,) = payload["results"]
    assert convae["precision"] == "fp32" and convae["wall_s"] > convae["pretrain_s"] > 0
    assert [m["phase"] for m in convae["metrics"]] == ["pretrain", "finetune"]


def test_learning_quality_benchmark_runs_the_protocol(tmp_path, image_folder):
    payload = run_script(
        "learning_quality",
        "--data",
        str(image_folder),
        "--presets",
        "seed",
        "--set",
        "pretrain_epochs=1",
        "height=16",
        "width=16",
        "channels=[8,16]",
        "latent_dim=32",
        "batch_size=8",
        "val_fraction=0.2",
        "device=cpu",
        f"cache_dir={tmp_path / 'cache'}",
        "--budgets",
        "2",
        "all",
        "--seeds",
        "2",
        "--steps",
        "2",
        "--sweep-batch-size",
        "8",
        "--out",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    (res,) = payload["results"]
    assert res["preset"] == "seed" and res["pretrain_s"] > 0 and "cpu" in payload["machine"]
    from convae.utils.device import cpu_flags  # the CPU's matrix units, which its model name does not say

    assert payload["machine"]["cpu_features"] == sorted(
        cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}
    )
    methods = {r["method"] for r in res["summary"]}
    assert {"finetune", "scratch", "logistic_probe", "logistic_random", "knn", "knn_random"} <= methods
    # every seed measured, but with every label the frozen-feature probes only once (the same data)
    assert all(
        r["n"] == (1 if r["labels_per_class"] == "all" and r["method"].startswith(("knn", "logistic")) else 2)
        for r in res["summary"]
    )
    for features in ("latent", "pooled"):
        for weights in ("pretrained", "random"):
            assert set(res["probes_all_labels"][features][weights]) == {"logistic", "knn"}


def test_learning_quality_probes_the_patch_network_and_its_whitening_alone(tmp_path, image_folder):
    payload = run_script(
        "learning_quality",
        "--data",
        str(image_folder),
        "--presets",
        "patches",
        "--probes-only",
        "--set",
        "pretrain_epochs=1",
        "height=16",
        "width=16",
        "channels=[8]",
        "kernel_size=4",
        "batch_size=8",
        "val_fraction=0.2",
        "device=cpu",
        f"cache_dir={tmp_path / 'cache'}",
        "--out",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    (res,) = payload["results"]
    probes = res["probes_all_labels"]
    assert list(probes) == ["pooled"]  # the patch network's features are pooled conv features: one kind
    assert set(probes["pooled"]) == {"pretrained", "random", "random_filters_whitened"}
    assert all(0 <= v["logistic"] <= 1 and 0 <= v["knn"] <= 1 for v in probes["pooled"].values())


def test_large_source_benchmark_runs_both_placements(tmp_path):
    payload = run_script(
        "large_source",
        "--gb",
        "0.0005",
        "--size",
        "16",
        "--batch",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    (r,) = payload["results"]
    n = int(0.0005e9 // (3 * 16 * 16))
    assert r["images"] == n and r["host"]["train_images"] == r["device"]["train_images"] == n - round(n * 0.1)
    assert r["host"]["placement"] == "host" and r["device"]["placement"] == "device"
    assert r["host"]["peak_rss_mib"] > 0 and r["host"]["images_per_s"] > 0
    assert not list(tmp_path.glob("tmp*"))  # the synthetic source is removed


def test_spherical_kmeans_finds_the_directions_the_data_clusters_around():
    sys.path.insert(0, str(BENCH))
    from kmeans_dictionary import spherical_kmeans

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 12, generator=g), dim=1)
    z = (centres.repeat(200, 1) + 0.05 * torch.randn(800, 12, generator=g)) * torch.rand(800, 1, generator=g).add(0.5)
    found = spherical_kmeans(z, 8, 20, torch.Generator().manual_seed(1))
    assert torch.allclose(found.norm(dim=1), torch.ones(8))
    assert (centres @ found.T).max(1).values.min() > 0.99  # every planted direction has a centroid on it


def test_kmeans_dictionary_benchmark_scores_three_dictionaries_in_one_encoder(tmp_path, image_folder):
    from convae.models import AutoEncoder, ModelConfig
    from convae.outputs.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ae = AutoEncoder(ModelConfig(arch="patch", channels=(8,), kernel_size=4, height=16, width=16, whiten=True))
    ae.encoder.fit_whitening(torch.rand(20, 3, 16, 16), torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ae.pt", ae, "autoencoder")
    payload = run_script(
        "kmeans_dictionary",
        "--checkpoint",
        str(tmp_path / "ae.pt"),
        "--data",
        str(image_folder),
        "--set",
        "val_fraction=0.2",
        "device=cpu",
        f"cache_dir={tmp_path / 'cache'}",
        "--images",
        "10",
        "--per-image",
        "4",
        "--iterations",
        "3",
        cwd=tmp_path,
    )
    assert payload["patches"] == 40 and set(payload["scores"]) == {"pretrained", "kmeans", "random"}
    assert all(0 <= s["logistic"] <= 1 and 0 <= s["knn"] <= 1 for s in payload["scores"].values())


def test_gpu_learning_script_runs_every_step_on_a_cpu(tmp_path, image_folder):
    """The GPU script as a user tries it first on a CPU: every sweep runs and its JSON is copied."""
    extra = (
        f"--height 16 --width 16 --channels 8 --kernel-size 4 --pretrain-epochs 1 --steps 2 --seeds 1 "
        f"--labels-per-class 2 --batch-size 8 --val-fraction 0.2 --cache-dir {tmp_path / 'cache'}"
    )
    env = {**os.environ, "DEVICE": "cpu", "SWEEP_ARGS": extra, "RUNS": str(tmp_path / "runs"), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_learning.sh"), str(image_folder), str(tmp_path / "results")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = {"learning_patches", "learning_patches_lr3e-4", "learning_patches_lr3e-3", "learning_patches1600"}
    assert {p.stem for p in (tmp_path / "results").glob("*.json")} == names  # the names results/gpu/ holds
    lr = json.loads((tmp_path / "results" / "learning_patches_lr3e-3.json").read_text())
    assert lr["lr"] == 3e-3 and set(lr["methods"]) == {"finetune", "scratch"}


def test_gpu_classifier_script_runs_every_step_on_a_cpu(tmp_path, image_folder):
    """The strong-classifier protocol as a user tries it first on a CPU, at toy size."""
    extra = (
        f"--height 16 --width 16 --channels 8 16 --batch-size 8 --val-fraction 0.2 --precision fp32 "
        f"--cache-dir {tmp_path / 'cache'}"
    )
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "EXTRA": extra,
        "FT_EXTRA": "--finetune-epochs 1 --epoch-images 8",
        "SWEEP_EXTRA": "--seeds 1 --labels-per-class 2 all",
        "PRETRAIN_EPOCHS": "1",
        "JOINT_STEPS": "2",
        "RUNS": str(tmp_path / "runs"),
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_classifier.sh"), str(image_folder), str(tmp_path / "results")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = {
        "classifier_scratch_all",
        "classifier_pretrain",
        "classifier_sweep",
        "classifier_sweep_lpft",
        "classifier_sweep_joint",
    }
    assert {p.stem for p in (tmp_path / "results").glob("*.json")} == names
    sweep = json.loads((tmp_path / "results" / "classifier_sweep.json").read_text())
    assert set(sweep["methods"]) == {"finetune", "scratch", "logistic_probe", "logistic_random"}
    assert sweep["budgets"] == [2, "all"] and sweep["steps"] is None  # the run's recipe, not a step count
    joint = json.loads((tmp_path / "results" / "classifier_sweep_joint.json").read_text())
    assert set(joint["methods"]) == {"joint_gamma", "joint_plain", "joint_finetune"} and joint["steps"] == 2
    assert joint["autoencoder"].endswith("autoencoder.pt")  # joint_finetune starts from step 3.'s
    scratch = json.loads((tmp_path / "results" / "classifier_scratch_all.json").read_text())
    assert scratch["init"] == "scratch" and 0 <= scratch["accuracy"] <= 1


def test_gpu_consistency_script_runs_every_step_on_a_cpu(tmp_path, image_folder):
    """Consistency training's protocol as a user tries it first on a CPU, at toy size."""
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "MODEL": "--height 16 --width 16 --channels 8 16",
        "EXTRA": f"--batch-size 4 --val-fraction 0.2 --precision fp32 --cache-dir {tmp_path / 'cache'}",
        "FT_EXTRA": "--finetune-epochs 1 --unlabelled-ratio 2",
        "SWEEP_EXTRA": "--seeds 1 --labels-per-class 2",
        "PRETRAIN_EPOCHS": "1",
        "STEPS": "2",
        "RUNS": str(tmp_path / "runs"),
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_consistency.sh"), str(image_folder), str(tmp_path / "results")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = {"consistency_pretrain", "consistency_few_25", "consistency_sweep"}
    assert {p.stem for p in (tmp_path / "results").glob("*.json")} == names
    few = json.loads((tmp_path / "results" / "consistency_few_25.json").read_text())
    assert few["init"] == "pretrained" and 0 <= few["accuracy"] <= 1
    sweep = json.loads((tmp_path / "results" / "consistency_sweep.json").read_text())
    assert "finetune_flexmatch" in sweep["methods"] and sweep["steps"] == 2
    assert all("curve" in c for c in sweep["cells"])
