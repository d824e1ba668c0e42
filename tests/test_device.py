"""Where and in which precision work runs."""

import pytest
import torch

from convae.device import autocast, micro_batch_size, resolve_device
from convae.errors import ConvaeError


def test_auto_picks_cuda_only_when_present():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
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
