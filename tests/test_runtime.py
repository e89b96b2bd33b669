"""Device and dtype choice: the one code path that sends a run to CUDA + bf16 on a GPU, checked without one."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from rlhf_lib.core import runtime


@pytest.fixture
def fake_host(monkeypatch):
    """Pretend the host has (or lacks) CUDA, CUDA bf16 and AMX."""

    def set_host(
        cuda: bool,
        cuda_bf16: bool = True,
        amx: bool = False,
        flags: tuple[str, ...] = (),
        capability: tuple[int, int] = (8, 0),
        speedup: float | None = 0.1,
    ) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        cpu_flags = frozenset(flags) | ({"amx_bf16"} if amx else frozenset())
        monkeypatch.setattr(runtime, "cpu_info", lambda: ("Fake CPU", cpu_flags))
        monkeypatch.setattr(runtime, "cached_bf16_speedup", lambda *a, **k: speedup)

    return set_host


def test_auto_picks_cuda_and_bf16_on_a_gpu_with_bf16(fake_host):
    fake_host(cuda=True, cuda_bf16=True)
    device = runtime.pick_device("auto")
    assert device == torch.device("cuda")
    assert runtime.pick_dtype("auto", device) == torch.bfloat16


def test_auto_picks_fp16_on_a_tensor_core_gpu_without_bf16(fake_host):
    fake_host(cuda=True, cuda_bf16=False, amx=True, capability=(7, 5))  # a T4; the CPU's AMX must not decide
    choice = runtime.choose_precision("auto", runtime.pick_device("auto"))
    assert choice.dtype == torch.float16
    assert "no bf16" in choice.reason and "7.x" in choice.reason


def test_auto_falls_back_to_fp32_on_a_gpu_without_tensor_cores(fake_host):
    fake_host(cuda=True, cuda_bf16=False, amx=True, capability=(6, 0))
    assert runtime.pick_dtype("auto", runtime.pick_device("auto")) == torch.float32


@pytest.mark.parametrize(
    "flags, speedup, expected, reason",
    [
        (("avx512f", "amx_bf16", "amx_tile"), 0.1, torch.bfloat16, "AMX"),  # Intel Sapphire Rapids and newer
        (("avx512f", "avx512_bf16", "avx512_vnni"), 0.1, torch.bfloat16, "AVX512-BF16"),  # AMD EPYC Zen 4, Cooper Lake
        (("avx2", "fma"), 0.07, torch.float32, "0.07x"),  # AVX2 only: bf16 is emulated, far slower than fp32
        (("asimd", "bf16"), 2.5, torch.bfloat16, "2.50x"),  # e.g. an Arm CPU whose probe finds bf16 faster
        (("avx2",), None, torch.float32, "probe is off"),
    ],
)
def test_auto_on_cpu_uses_bf16_where_the_cpu_has_it(fake_host, flags, speedup, expected, reason):
    fake_host(cuda=False, flags=flags, speedup=speedup)
    device = runtime.pick_device("auto")
    assert device == torch.device("cpu")
    choice = runtime.choose_precision("auto", device)
    assert choice.dtype == expected
    assert reason in choice.reason


def test_bf16_flags_decide_without_running_the_probe():
    def probe():
        raise AssertionError("the probe must not run when the flags decide")

    assert runtime.choose_cpu_precision(frozenset({"avx512_bf16"}), probe).dtype == torch.bfloat16
    assert runtime.choose_cpu_precision(frozenset({"avx2"}), lambda: 1.49).dtype == torch.float32
    assert runtime.choose_cpu_precision(frozenset({"avx2"}), lambda: 1.5).dtype == torch.bfloat16


def test_probe_runs_once_per_machine_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_LAB_CACHE", str(tmp_path))
    monkeypatch.delenv(runtime.PROBE_ENV, raising=False)
    calls = []

    def probe() -> float:
        calls.append(1)
        return 3.25

    assert runtime.cached_bf16_speedup(probe) == 3.25
    assert runtime.cached_bf16_speedup(probe) == 3.25
    assert len(calls) == 1
    assert list(json.loads((tmp_path / "bf16-probe.json").read_text()).values()) == [3.25]
    monkeypatch.setenv(runtime.PROBE_ENV, "off")
    assert runtime.cached_bf16_speedup(probe) is None


def test_matmul_probe_is_fp32_time_over_bf16_time():
    """A stand-in matmul that takes 4 ms in fp32 and 1 ms in bf16: the probe must read about 4 (not 1/4)."""

    def matmul(x, y):
        time.sleep(0.004 if x.dtype == torch.float32 else 0.001)
        return x @ y

    ratio = runtime.time_matmuls(n=8, seconds=0.2, matmul=matmul)
    assert 2.0 < ratio < 4.5  # sleeps overrun on a busy host, which pulls the ratio towards 1, never past 4 by much
    real = runtime.time_matmuls(n=64, seconds=0.05)  # the real kernels: a finite positive ratio
    assert math.isfinite(real) and real > 0


def test_cpu_info_reads_the_flags_of_this_machine():
    model, flags = runtime.cpu_info()
    if runtime.Path("/proc/cpuinfo").exists():
        assert flags, "a Linux host lists CPU feature flags"
    assert isinstance(model, str)


def test_describe_device_records_the_choice_and_its_reason(fake_host):
    fake_host(cuda=False, flags=("avx512_bf16",))
    info = runtime.describe_device(torch.device("cpu"), "auto")
    assert info["precision"] == {
        "setting": "auto",
        "dtype": "bfloat16",
        "reason": "CPU has AVX512-BF16 instructions (avx512_bf16)",
    }
    assert info["cpu_bf16_flags"] == ["avx512_bf16"]


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
    with pytest.raises(ValueError, match="'half' is not one of auto, float32, bfloat16, float16"):
        runtime.pick_dtype("half", torch.device("cpu"))


def test_autocast_runs_matmuls_in_bf16_and_is_a_no_op_for_fp32():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with runtime.autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with runtime.autocast(torch.device("cpu"), torch.float32):
        assert (a @ b).dtype == torch.float32


def test_a_stage_records_the_precision_choice_in_the_manifest(fake_host, tmp_path):
    from rlhf_lib.core.config import CommonConfig
    from rlhf_lib.core.runs import start_stage

    fake_host(cuda=False, flags=("avx2",), speedup=0.07)
    run = start_stage(CommonConfig(run="precision", outputs_dir=str(tmp_path), dtype="auto"), "data")
    precision = run.manifest()["device"]["precision"]
    assert precision["dtype"] == "float32" and "0.07x" in precision["reason"]
