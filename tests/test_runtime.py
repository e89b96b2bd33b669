"""Device and dtype choice: the one code path that sends a run to CUDA + bf16 on a GPU, checked without one."""
from __future__ import annotations

import pytest
import torch

from rlhf_lib import runtime


@pytest.fixture
def fake_host(monkeypatch):
    """Pretend the host has (or lacks) CUDA, CUDA bf16 and AMX."""

    def set_host(cuda: bool, cuda_bf16: bool = True, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(runtime, "cpu_has_amx", lambda: amx)

    return set_host


def test_auto_picks_cuda_and_bf16_on_a_gpu_with_bf16(fake_host):
    fake_host(cuda=True, cuda_bf16=True)
    device = runtime.pick_device("auto")
    assert device == torch.device("cuda")
    assert runtime.pick_dtype("auto", device) == torch.bfloat16


def test_auto_falls_back_to_fp32_on_a_gpu_without_bf16(fake_host):
    fake_host(cuda=True, cuda_bf16=False, amx=True)  # the CPU's AMX must not decide a GPU run's dtype
    assert runtime.pick_dtype("auto", runtime.pick_device("auto")) == torch.float32


@pytest.mark.parametrize("amx, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_uses_bf16_only_with_amx(fake_host, amx, expected):
    fake_host(cuda=False, amx=amx)
    device = runtime.pick_device("auto")
    assert device == torch.device("cpu")
    assert runtime.pick_dtype("auto", device) == expected


def test_explicit_choices_are_taken_as_given(fake_host):
    fake_host(cuda=True, cuda_bf16=True, amx=True)
    assert runtime.pick_device("cpu") == torch.device("cpu")
    assert runtime.pick_device("cuda:1") == torch.device("cuda", 1)
    assert runtime.pick_dtype("fp32", torch.device("cuda")) == torch.float32
    assert runtime.pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_cuda_requested_without_cuda_names_the_fix(fake_host):
    fake_host(cuda=False)
    with pytest.raises(ValueError, match="CUDA is not available; use device: auto or cpu"):
        runtime.pick_device("cuda")


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="'half' is not one of auto, float32, bfloat16"):
        runtime.pick_dtype("half", torch.device("cpu"))


def test_autocast_runs_matmuls_in_bf16_and_is_a_no_op_for_fp32():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with runtime.autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with runtime.autocast(torch.device("cpu"), torch.float32):
        assert (a @ b).dtype == torch.float32
