"""The A/B scripts in scripts/ run on the smallest inputs and report what they measure: the two paths agree.

Each runs as a subprocess (as one would run it: its own threads, its own compiled kernels) with one thread.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
NUMBER = r"([0-9.]+(?:e[-+]?[0-9]+)?)"


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def numbers(pattern: str, text: str) -> list[float]:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return [float(g) for g in match.groups()]


@pytest.mark.slow
def test_ab_logprobs_variants_agree_to_fp32_rounding():
    out = run_script("ab_logprobs.py", "--batch", "2", "--tokens", "4", "--vocab", "256", "--repeats", "1")
    for variant in ("chunked, sliced", "fused"):
        diffs = numbers(
            rf"{variant} vs chunked: max \|difference\| log-prob {NUMBER}, entropy {NUMBER}, gradient {NUMBER}", out
        )
        assert max(diffs) < 1e-5, f"{variant} disagrees with the chunked pass: {diffs}"
    timed = [line.split()[0] for line in out.splitlines() if " forward " in line and " backward " in line]
    assert timed == ["chunked,", "chunked", "fused"]


@pytest.mark.slow
def test_ab_prefix_packed_row_agrees_with_the_padded_batch():
    """On the tiny model in fp32: the bench prompts share their chat-template prefix, the packed row is shorter, and
    its log-probs and rewards match the padded batch's to rounding (a LoRA policy at init is its reference)."""
    args = ("--model", "tiny:llama", "--config", "ours-lora-fp32", "--response-length", "8", "--threads", "1")
    out = run_script("ab_prefix.py", *args, "--repeats", "1")
    prefix, packed, padded = numbers(rf"shared prefix: {NUMBER} tokens; packed row {NUMBER} instead of {NUMBER}", out)
    assert prefix >= 8 and packed < padded
    logprob, shared_ref, padded_ref, reward = numbers(
        rf"shared vs padded: {NUMBER} nats/token; policy - reference at init: {NUMBER} \(shared\), {NUMBER} "
        rf"\(padded\); reward max \|difference\| {NUMBER}",
        out,
    )
    assert logprob < 1e-4 and reward < 1e-4, out
    assert shared_ref < 1e-6 and padded_ref < 1e-6, out
    assert "padded batch   policy+value forward" in out and "shared prefix  policy+value forward" in out
