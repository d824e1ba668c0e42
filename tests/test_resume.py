"""Nothing lost: kill -9 and resume, SIGINT, NaN losses and failed writes."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_image_folder
from convae.cli import main
from convae.models.objectives import Objective

ARGS = [
    "--height",
    "32",
    "--width",
    "32",
    "--channels",
    "64",
    "128",
    "128",
    "--latent-dim",
    "256",
    "--batch-size",
    "8",
    "--val-fraction",
    "0.2",
    "--pretrain-epochs",
    "3",
    "--finetune-epochs",
    "3",
    "--device",
    "cpu",
]
TIMING = {"seconds", "images_per_s"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return make_image_folder(root / "data", classes=3, per_class=80, size=(32, 32)), root / "cache"


def _cmd(data, cache, out, *extra):
    return [
        sys.executable,
        "-m",
        "convae",
        "run",
        "--data",
        str(data),
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        *ARGS,
        *extra,
    ]


def _env():
    # the same thread count in every process, so every run does the same arithmetic
    return {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2"}


def _metrics(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weights(out, name):
    return torch.load(out / "checkpoints" / f"{name}.pt", weights_only=True)["model"]


def _same_run(a, b):
    for name in ("autoencoder", "classifier"):
        wa, wb = _weights(a, name), _weights(b, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}.{k} differs"
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]
    assert strip(_metrics(a)) == strip(_metrics(b))
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["confusion_matrix"] == rb["confusion_matrix"]
    # a run resumed inside fine-tuning still measures the pretrained representation
    for key in ("knn_accuracy", "linear_probe_accuracy", "random"):
        assert ra["representation"][key] == rb["representation"][key]
    assert (a / "figures" / "embedding_map.png").is_file() and (b / "figures" / "embedding_map.png").is_file()


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    data, cache = dataset
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(data, cache, out), check=True, env=_env(), capture_output=True)
    return out


def _wait_for_lines(proc, out, n, timeout=120):
    start = time.time()
    while len(_metrics(out)) < n:
        if proc.poll() is not None:
            return False
        assert time.time() - start < timeout, "the run made no progress"
        time.sleep(0.005)
    return True


def _start_then_kill(cmd, out, after_lines, rng):
    """Start a run, wait until it trains and has ``after_lines`` epochs logged, kill -9 a moment later."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("run folder:"):
            break
    if _wait_for_lines(proc, out, after_lines):
        time.sleep(rng.uniform(0.02, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    state = out / "checkpoints" / "state.pt"
    if state.exists():  # whatever the moment, the saved state is whole and never ahead of the log
        assert len(torch.load(state, weights_only=True)["metrics"]) <= len(_metrics(out))


def test_kill_9_at_random_points_then_resume_gives_the_same_run(dataset, reference, tmp_path):
    data, cache = dataset
    out = tmp_path / "killed"
    rng = random.Random(1234)
    _start_then_kill(_cmd(data, cache, out), out, 0, rng)  # inside pretraining epoch 1
    for lines in (2, 3, 4):  # ... pretraining epoch 3, fine-tuning epochs 1 and 2
        _start_then_kill(_resume_cmd(out), out, lines, rng)
        assert len(_metrics(out)) <= 6
    done = subprocess.run(_resume_cmd(out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _same_run(out, reference)


def _resume_cmd(out):
    return [sys.executable, "-m", "convae", "run", "--out", str(out), "--resume"]


def test_sigint_finishes_the_step_saves_and_resumes(dataset, reference, tmp_path):
    data, cache = dataset
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _cmd(data, cache, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert _wait_for_lines(proc, out, 1)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and f"convae run --out {out} --resume" in err and "Traceback" not in err
    state = torch.load(out / "checkpoints" / "state.pt", weights_only=True)
    assert state["phase"] in ("pretrain", "finetune")
    done = subprocess.run(_resume_cmd(out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _same_run(out, reference)


def test_resume_of_a_finished_run_and_of_nothing(dataset, reference, tmp_path, capsys):
    assert main(["run", "--out", str(reference), "--resume"]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["run", "--out", str(reference), "--resume", "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err


def test_nan_loss_stops_with_the_last_good_state_intact(dataset, tmp_path, monkeypatch, capsys):
    data, cache = dataset
    calls = {"n": 0}
    real = Objective.__call__

    def poisoned(self, model, batch, generator=None):
        calls["n"] += 1
        loss = real(self, model, batch, generator)
        return loss * float("nan") if calls["n"] > 26 else loss  # 24 chunks an epoch: NaN in epoch 2

    monkeypatch.setattr(Objective, "__call__", poisoned)
    out = tmp_path / "nan"
    assert main(["run", "--data", str(data), "--cache-dir", str(cache), "--out", str(out)] + ARGS) == 2
    err = capsys.readouterr().err
    assert "pretrain loss became nan in epoch 2" in err and "last good epoch" in err
    state = torch.load(out / "checkpoints" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(_metrics(out)) == 1
    # stopped in pretraining: finetune --resume says which command continues it (not "pass --checkpoint")
    assert main(["finetune", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped in pretraining" in err[0] and f"convae run --out {out} --resume" in err[0]


def test_a_failed_state_write_keeps_the_previous_one(dataset, tmp_path, monkeypatch, capsys):
    """The second state write meets a full disk at its file write (simulated; test_hostile.py fills a real one)."""
    import convae.utils.files as files

    data, cache = dataset
    real_bytes, real_fsync = files.torch_bytes, files.os.fsync
    calls = {"n": 0, "fail": False}

    def serialise(obj):
        if isinstance(obj, dict) and "optimizer" in obj:  # the training state
            calls["n"] += 1
            calls["fail"] = calls["n"] == 2
        return real_bytes(obj)

    def fsync(fd):
        if calls["fail"]:
            calls["fail"] = False
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files, "torch_bytes", serialise)
    monkeypatch.setattr(files.os, "fsync", fsync)
    out = tmp_path / "full"
    assert main(["run", "--data", str(data), "--cache-dir", str(cache), "--out", str(out)] + ARGS) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "could not write" in err and "state.pt: No space left on device" in err
    assert torch.load(out / "checkpoints" / "state.pt", weights_only=True)["epoch"] == 1
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "extra, after, phase",
    [
        (
            ("--augment", "--jitter", "0.2", "--objective", "masked", "--norm", "batch", "--output-activation", "none"),
            1,
            "pretrain",
        ),
        (("--preset", "patches", "--channels", "16", "--kernel-size", "5"), 1, "pretrain"),  # whitening fitted once
        # the fine-tuning recipe: a per-step schedule, the weight average, LP-FT and repeated epochs, stopped inside
        # fine-tuning epoch 2
        (
            (
                "--arch",
                "blocks",
                "--channels",
                "8",
                "16",
                "--objective",
                "masked",
                "--augment",
                "--optimizer",
                "nesterov",
                "--lr",
                "0.05",
                "--schedule",
                "triangle",
                "--warmup",
                "0.3",
                "--ema",
                "0.9",
                "--label-smoothing",
                "0.1",
                "--lp-ft",
                "--tta",
                "--epoch-images",
                "300",
            ),
            4,
            "finetune",
        ),
        # joint training (the Gamma-model): both streams, the noise and the loss terms, stopped inside its epoch 2
        (
            (
                "--arch",
                "blocks",
                "--channels",
                "8",
                "16",
                "--augment",
                "--joint",
                "gamma",
                "--labels-per-class",
                "5",
                "--pretrain-epochs",
                "1",
                "--schedule",
                "triangle",
                "--ema",
                "0.9",
            ),
            2,
            "finetune",
        ),
        # consistency training (FreeMatch): the weak and strong views and the thresholds' state, inside its epoch 2
        (
            (
                "--arch",
                "blocks",
                "--channels",
                "8",
                "16",
                "--augment",
                "--joint",
                "freematch",
                "--threshold-momentum",
                "0.9",
                "--unlabelled-ratio",
                "2",
                "--labels-per-class",
                "5",
                "--pretrain-epochs",
                "1",
                "--ema",
                "0.9",
            ),
            2,
            "finetune",
        ),
    ],
    ids=["masked", "patches", "recipe", "joint", "consistency"],
)
def test_augmentation_and_masking_replay_exactly_after_a_mid_epoch_stop(dataset, tmp_path, extra, after, phase):
    """The augmented batches, the masks (or crops) and the recipe's state of a resumed epoch are those of
    the uninterrupted run."""
    data, cache = dataset
    ref = tmp_path / "ref"
    subprocess.run(_cmd(data, cache, ref, *extra), check=True, env=_env(), capture_output=True)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        _cmd(data, cache, out, *extra), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert _wait_for_lines(proc, out, after)
    proc.send_signal(signal.SIGINT)  # inside the next epoch: the state holds a step within it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = torch.load(out / "checkpoints" / "state.pt", weights_only=True)
    assert state["phase"] == phase and state["epoch"] == 1
    done = subprocess.run(_resume_cmd(out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _same_run(out, ref)
