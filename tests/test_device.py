"""Where and in which precision work runs."""

import json

import pytest
import torch

from convae.utils.device import autocast, micro_batch_size, resolve_device
from convae.utils.errors import ConvaeError

HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def test_auto_picks_cuda_only_when_present():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "mps" if HAS_MPS else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_is_a_user_error():
    with pytest.raises(ConvaeError, match="no CUDA GPU") as info:
        resolve_device("cuda")
    assert "--device cpu" in info.value.advice and "--" not in str(info.value)


def test_autocast_is_bf16_only_when_asked_for():
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (a @ b).dtype == torch.float32


def test_micro_batch_defaults():
    assert micro_batch_size(0, "fp32", torch.device("cpu")) == 200
    assert micro_batch_size(0, "bf16", torch.device("cpu")) == 500
    assert micro_batch_size(0, "fp32", torch.device("cuda")) is None
    assert micro_batch_size(32, "fp32", torch.device("cpu")) == 32


def test_precision_auto_picks_what_the_hardware_runs_fast(monkeypatch):
    import convae.utils.device as dev

    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx512f", "avx512bw"})  # Cascade Lake: AVX-512, no bf16
    warned = []
    assert dev.resolve_precision("auto", cpu, warned.append) == "fp32" and not warned
    assert dev.resolve_precision("bf16", cpu, warned.append) == "bf16"  # honoured, but said to be slow
    assert len(warned) == 1 and "no hardware support" in warned[0] and "--precision auto" in warned[0]
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert dev.resolve_precision("auto", cpu, warned.append) == "bf16" and len(warned) == 1
    assert dev.resolve_precision("fp32", cpu, warned.append) == "fp32"


def test_precision_auto_on_a_pre_ampere_gpu_is_fp16_and_fp16_needs_cuda(monkeypatch):
    import convae.utils.device as dev
    from convae.utils.errors import ConvaeError

    gpu = torch.device("cuda")
    for capability, expect in (((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert dev.resolve_precision("auto", gpu) == expect
    assert isinstance(dev.grad_scaler("fp16", torch.device("cpu")), torch.amp.GradScaler)
    assert dev.grad_scaler("bf16", gpu) is None and dev.grad_scaler("fp32", gpu) is None
    with pytest.raises(ConvaeError, match="fp16 needs a CUDA GPU"):
        dev.resolve_precision("fp16", torch.device("cpu"))


def test_the_precision_that_ran_is_recorded(tmp_path, monkeypatch):
    import convae.utils.device as dev
    from conftest import make_image_folder
    from convae.cli import main

    monkeypatch.setattr(dev, "cpu_flags", lambda: set())
    data = make_image_folder(tmp_path / "d", classes=2, per_class=4)
    out = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(data),
                "--cache-dir",
                str(tmp_path / "c"),
                "--out",
                str(out),
                "--precision",
                "auto",
                "--height",
                "16",
                "--width",
                "16",
                "--channels",
                "8",
                "16",
                "--latent-dim",
                "16",
                "--pretrain-epochs",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["precision"] == "fp32" and results["provenance"]["precision"] == "fp32"
    assert json.loads((out / "config.json").read_text())["precision"] == "fp32"  # a resume runs the same arithmetic


@pytest.mark.skipif(HAS_MPS, reason="this machine has MPS")
def test_asking_for_mps_without_it_is_one_clear_error():
    with pytest.raises(ConvaeError, match="no Apple-silicon GPU"):
        resolve_device("mps")


@pytest.mark.skipif(not HAS_MPS, reason="needs Apple's MPS")
def test_auto_picks_mps_where_there_is_no_cuda():  # pragma: no cover - runs on Apple silicon only
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "mps"


def test_version_from_a_source_tree_that_is_not_installed(monkeypatch):
    import importlib.metadata

    import convae
    from convae.utils.device import convae_version

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    assert convae_version() == importlib.metadata.version("convae")
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert convae_version() == f"{convae.__version__} (source tree)"
