"""DDP through torchrun: 2 CPU processes (gloo) train like one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed

from conftest import make_image_folder
from convae.cli import main
from convae.data import DeviceBatches

ARGS = [
    "--height",
    "16",
    "--width",
    "16",
    "--channels",
    "8",
    "16",
    "--latent-dim",
    "32",
    "--batch-size",
    "10",
    "--val-fraction",
    "0.2",
    "--pretrain-epochs",
    "2",
    "--finetune-epochs",
    "2",
    "--device",
    "cpu",
]


def test_ranks_take_disjoint_shards_of_the_same_permutation():
    images = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1)
    whole = DeviceBatches(images, torch.arange(23), batch_size=8, shuffle=True, seed=3)
    shards = [
        DeviceBatches(images, torch.arange(23), batch_size=8, shuffle=True, seed=3, rank=r, world_size=2)
        for r in range(2)
    ]
    for b in [whole, *shards]:
        b.set_epoch(4)
    for step, ((_, y), (_, y0), (_, y1)) in enumerate(zip(whole, *shards)):
        assert sorted(torch.cat([y0, y1]).tolist()) == sorted(y.tolist())  # disjoint and covering
        assert whole.global_size(step) == len(y)


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_worker_leaves_without_the_interpreters_teardown(world):
    """DDP keeps gloo's threads alive past destroy_process_group; a rank torn down around them aborted
    now and then ("terminate called without an active exception"). A worker's exit handlers run and its
    output is flushed, but nothing is finalised; one process exits as usual. The status is kept both ways."""
    code = (
        "import atexit, sys; from convae.utils.distributed import leave\n"
        "class Torn:\n    def __del__(self): print('torn down', flush=True)\n"
        "kept = Torn(); atexit.register(lambda: print('exit handlers ran')); sys.stdout.write('unflushed'); "
        "leave(3)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "WORLD_SIZE": world},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("unflushed") and "exit handlers ran" in done.stdout
    assert ("torn down" in done.stdout) == (world == "1"), done.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("extra", [(), ("--joint", "plain", "--labels-per-class", "4")], ids=["run", "joint"])
def test_two_gloo_processes_match_one_process(tmp_path, extra):
    """Under joint training both streams are sharded: 36 unlabelled images (batches of 10, 10, 10, 6)
    and 12 labelled ones (10, 2) split evenly, so the ranks' mean gradients are the global batch's."""
    data = make_image_folder(tmp_path / "data", per_class=15)  # 36 training images: uneven last batch
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    args = ARGS + list(extra)
    assert main(["run", "--data", str(data), "--cache-dir", str(cache), "--out", str(single)] + args) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "convae",
            "run",
            "--data",
            str(data),
            "--cache-dir",
            str(cache),
            "--out",
            str(ddp),
        ]
        + args,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pretrain  epoch 1/2") == 1  # rank 0 alone prints and writes
    assert "2 processes" in done.stdout
    for name in ("autoencoder", "classifier"):
        a = torch.load(single / "checkpoints" / f"{name}.pt", weights_only=True)["model"]
        b = torch.load(ddp / "checkpoints" / f"{name}.pt", weights_only=True)["model"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=f"{name}.{k}")
    ma = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == 4
    for ra, rb in zip(ma, mb):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4)
        for key in ("train_supervised", "train_unsupervised"):  # joint training's terms, over both ranks
            assert (key in rb) == (key in ra) == (bool(extra) and ra["phase"] == "finetune")
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4)
    assert json.loads((ddp / "results.json").read_text())["num_images"] == 9
