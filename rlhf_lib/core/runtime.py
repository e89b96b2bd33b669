"""Process-level settings: seeding, threads, device and dtype choice, mixed-precision context."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) once, from one place, so a run is reproducible from its seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_threads(threads: int) -> int:
    """Set torch's intra-op thread count (0 = leave torch's default); returns the count in use.

    On a small shared CPU, more busy-waiting OpenMP threads than free cores slow decoding badly, so the pipeline
    also exports OMP_WAIT_POLICY=PASSIVE before torch starts.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# bf16 is taken on a CPU without bf16 instructions only when the probe measures at least this speed-up over fp32
# (bf16 through AMX or AVX512-BF16 is several times faster; emulated bf16 is slower than fp32).
PROBE_MIN_SPEEDUP = 1.5
PROBE_ENV = "RLHF_LAB_BF16_PROBE"  # "off": never probe (a CPU without bf16 instructions then runs fp32)


@dataclass(frozen=True)
class Precision:
    """The compute dtype a run uses and why it was chosen (logged once and recorded in the manifest)."""

    dtype: torch.dtype
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"dtype": str(self.dtype).replace("torch.", ""), "reason": self.reason}


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo; ("", {}) where there is none (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return "", frozenset()
    model = re.search(r"^(?:model name|Model|CPU part)\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    return (model.group(1).strip() if model else ""), frozenset(flags.group(1).split() if flags else ())


def time_matmuls(
    n: int = 512, seconds: float = 0.5, matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul
) -> float:
    """fp32 time / bf16 time of an n x n `matmul`, alternating the two for about `seconds` (medians of each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    for x, y in pairs.values():  # warm up both kernels
        matmul(x, y)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times[torch.float32]) < 3:
        for dtype, (x, y) in pairs.items():  # alternate, so a busy spell on a shared host slows both alike
            t0 = time.perf_counter()
            matmul(x, y)
            times[dtype].append(time.perf_counter() - t0)
    return float(np.median(times[torch.float32]) / np.median(times[torch.bfloat16]))


def _probe_cache_path() -> Path:
    root = Path(os.environ.get("RLHF_LAB_CACHE", Path.home() / ".cache" / "rlhf-lab")).expanduser()
    return root / "bf16-probe.json"


def cached_bf16_speedup(probe: Callable[[], float] = time_matmuls) -> float | None:
    """The bf16-over-fp32 matmul speed-up of this CPU, measured once per (CPU, torch version) and cached."""
    if os.environ.get(PROBE_ENV, "").lower() in ("off", "0", "false", "no"):
        return None
    model, flags = cpu_info()
    flags_id = hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:8]
    key = f"{model}|{flags_id}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    path = _probe_cache_path()
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = round(probe(), 3)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the probe simply runs again next time
    return float(cache[key])


def choose_cpu_precision(flags: frozenset[str], speedup: Callable[[], float | None] = cached_bf16_speedup) -> Precision:
    """bf16 where the CPU has bf16 matrix instructions (AMX, AVX512-BF16), or where a probe measures bf16 faster."""
    if "amx_bf16" in flags:
        return Precision(torch.bfloat16, "CPU has AMX bf16 tiles (amx_bf16)")
    if "avx512_bf16" in flags:
        return Precision(torch.bfloat16, "CPU has AVX512-BF16 instructions (avx512_bf16)")
    measured = speedup()
    if measured is None:
        return Precision(torch.float32, f"CPU lacks AMX and AVX512-BF16 and the bf16 probe is off ({PROBE_ENV})")
    if measured >= PROBE_MIN_SPEEDUP:
        return Precision(torch.bfloat16, f"bf16 matmuls measured {measured:.2f}x as fast as fp32 on this CPU")
    return Precision(
        torch.float32,
        f"CPU lacks AMX and AVX512-BF16; bf16 matmuls measured {measured:.2f}x of "
        f"fp32's speed (bf16 needs >= {PROBE_MIN_SPEEDUP}x)",
    )


def choose_cuda_precision(device: torch.device) -> Precision:
    """bf16 on GPUs that have it (Ampere and newer); fp16 with loss scaling on older tensor-core GPUs (T4, V100)."""
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return Precision(torch.bfloat16, f"{name} supports bf16")
    major, _minor = torch.cuda.get_device_capability(device)
    if major >= 7:
        return Precision(
            torch.float16, f"{name} has no bf16; fp16 tensor cores (compute capability {major}.x), with loss scaling"
        )
    return Precision(torch.float32, f"{name} has neither bf16 nor fp16 tensor cores")


def choose_precision(dtype: str, device: torch.device) -> Precision:
    """Resolve the ``dtype`` setting: an explicit name is taken as given; 'auto' is decided by the hardware."""
    if dtype in DTYPES:
        return Precision(DTYPES[dtype], f"dtype: {dtype} was set")
    if dtype != "auto":
        raise ValueError(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
    if device.type == "cuda":
        choice = choose_cuda_precision(device)
    elif device.type == "cpu":
        choice = choose_cpu_precision(cpu_info()[1], cached_bf16_speedup)
    else:
        choice = Precision(torch.float32, f"device {device.type}: fp32")
    _log_choice(device.type, choice)
    return choice


@lru_cache(maxsize=None)
def _log_choice(device_type: str, choice: Precision) -> None:
    """One line per process and choice, so a run's log says which path it took and why."""
    print(
        f"[runtime] dtype auto on {device_type}: {str(choice.dtype).replace('torch.', '')} ({choice.reason})",
        file=sys.stderr,
        flush=True,
    )


def pick_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu' / 'cuda' / 'cuda:1' are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use device: auto or cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast (see :func:`choose_precision`)."""
    return choose_precision(dtype, device).dtype


def mixed_precision_name(dtype: torch.dtype) -> str:
    """accelerate's / transformers' name of an autocast dtype: "bf16", "fp16" or "no"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision: fp32 master weights, matmuls in `dtype` (no-op for fp32)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def describe_device(device: torch.device, dtype: str | None = None) -> dict:
    """A small JSON-able description of the compute device (and, given the dtype setting, the precision chosen)."""
    info: dict = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    else:
        model, flags = cpu_info()
        info["cpu_model"] = model
        info["cpu_bf16_flags"] = sorted(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    if dtype is not None:
        info["precision"] = {"setting": dtype, **choose_precision(dtype, device).as_dict()}
    return info
