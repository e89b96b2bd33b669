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


def test_pipeline_costs_adds_up_what_the_run_recorded(tmp_path):
    import json

    run = tmp_path / "r"
    for folder in ("reward_model", "ppo", "eval"):
        (run / folder).mkdir(parents=True)
    stages = {
        "data": {"status": "done", "started": "2026-01-01T00:00:00+00:00", "ended": "2026-01-01T00:00:09+00:00"},
        "ppo": {"status": "done", "started": "2026-01-01T00:01:00+00:00", "ended": "2026-01-01T00:03:30+00:00"},
        "eval": {"status": "running", "started": "2026-01-01T00:04:00+00:00"},
    }
    (run / "manifest.json").write_text(json.dumps({"stages": stages, "git": {"commit": "abc"}}))
    ev = {"before": {"gold_score": 0.5, "kl": 0.0}, "after": {"gold_score": 0.625, "kl": 2.5}, "win_rate_vs_ref": 0.6}
    (run / "summary.json").write_text(json.dumps({"reward_model": {"eval_seconds": 7.5}, "eval": ev}))
    training = {"trunk_seconds": 40.0, "train_seconds": 100.0, "n_train_pairs": 12, "cached_trunk_blocks": 3}
    (run / "reward_model" / "training.json").write_text(json.dumps(training))
    rows = [
        {"time/generation": 2.0, "time/forward": 9.0, "time/optimization": 3.0, "time/update": 14.0,
         "memory/peak_rss_gib": 1.5},
        {"time/generation": 1.0, "time/forward": 1.0, "time/optimization": 2.0, "time/update": 4.0,
         "memory/peak_rss_gib": 1.75},
    ]  # fmt: skip
    (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval" / "results.json").write_text(json.dumps({"seconds": {"reference": 3.0}, "reference_cached": True}))
    out = json.loads(run_script("pipeline_costs.py", str(run), "--peak-rss-gib", "2.5"))
    assert out["stages_s"] == {"data": 9.0, "ppo": 150.0}  # an unfinished stage has no wall time
    assert out["reward_model"]["epochs_s"] == 60.0 and out["reward_model"]["heldout_eval_s"] == 7.5
    ppo = out["ppo"]
    assert (ppo["generation_s"], ppo["forward_s"], ppo["optimization_s"], ppo["update_s"]) == (3.0, 10.0, 5.0, 18.0)
    assert ppo["first_update_forward_s"] == 9.0 and ppo["peak_rss_gib"] == 1.75 and ppo["updates"] == 2
    assert out["eval"] == {"reference": 3.0, "reference_cached": True} and out["peak_rss_gib"] == 2.5
    assert out["outcome"]["gold_gain"] == 0.125 and out["outcome"]["kl"] == 2.5
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pipeline_costs.py"), str(tmp_path)],
                          env=ENV, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and "no manifest.json" in proc.stderr
