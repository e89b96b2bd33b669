"""Process-level settings: seeding, threads, device and dtype choice, mixed-precision context."""
from __future__ import annotations

import contextlib
import os
import random
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) once, from one place (DESIGN house rule 6)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_threads(threads: int) -> int:
    """Set torch's intra-op thread count (0 = leave torch's default); returns the count in use.

    On a shared 2-core machine oversubscription is catastrophic (busy-waiting OpenMP threads of several processes
    stall each other), so the pipeline also exports OMP_WAIT_POLICY=PASSIVE before torch starts.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """True when the CPU advertises AMX bf16 tiles (bf16 matmuls are then much faster than fp32)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def pick_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu' / 'cuda' / 'cuda:1' are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use device: auto or cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast: 'auto' = bf16 on CUDA with bf16 support or on an AMX CPU, else fp32."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype in table:
        return table[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype={dtype!r} is not one of auto, float32, bfloat16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_amx() else torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision: fp32 master weights, matmuls in `dtype` (no-op for fp32)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def describe_device(device: torch.device) -> dict:
    """A small JSON-able description of the compute device for manifests and benchmarks."""
    info: dict = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    else:
        info["amx_bf16"] = cpu_has_amx()
    return info
