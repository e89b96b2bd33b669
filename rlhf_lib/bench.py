"""`make bench`: PPO and reward-model throughput, ours against TRL 1.12's PPOTrainer, measured side by side.

Workload (the one TRL 1.12's published figures describe): SmolLM2-135M-Instruct as policy, reference, reward and
value model (the reward/value score head is a random initialisation: no trained RM is needed for timing), batch 8,
48-token responses at T = 0.7, 4 PPO epochs, 1 minibatch, the same 12 review prompts on both sides. Every
configuration runs in its own subprocess, so its peak RSS is its own (read with ``os.wait4``); warm-up updates
(compiling included) are excluded from the figures.

    python -m rlhf_lib.bench                         # our configurations, ratios vs TRL's published figures
    python -m rlhf_lib.bench --trl                   # also TRL 1.12 in .venv-trl112 (created on first use)
    python -m rlhf_lib.bench --configs ours-default --updates 5 --warmup 2 --threads 1
    python -m rlhf_lib.bench --trl --omp-wait-policy PASSIVE   # threads sleep between ops (shared machines)
    python -m rlhf_lib.bench --shape seed --trl      # the seed profile's PPO shape (rlhf_lib.bench_shapes)
    python -m rlhf_lib.bench --shape seed --model tiny:gpt2 --warmup 0 --updates 1 --trl   # its CPU dry run

Configurations (``--configs``): every ``ours-*`` one is the default profile's PPO stage (``params/default.yaml``:
LoRA on policy and value, reference and reward = the adapter-off bases, dtype auto, compiled transformer blocks)
on this workload, with the changes :data:`PPO_CONFIGS` lists. ``ours-default`` changes nothing: it is the
reference configuration of the ``*_ratio_vs_trl`` keys. ``ours-full-fp32`` has TRL's algorithmic content (four full
models, full fine-tuning, fp32); ``rm`` / ``rm-compile`` time the reward-model stage (RewardTrainer steps per second
with the default RewardModelConfig on synthetic ~150-token pairs). Every process, TRL's too, runs with the same
``OMP_WAIT_POLICY`` (``--omp-wait-policy``; see :func:`child_env`). Before each measured process a host probe
times fixed bf16 and fp32 matmuls (``--probe-repeats``; :func:`run_host_probe`): their median times say how
contended the host was for that run, which the load average does not show on a shared machine.
Shapes (``--shape``; :mod:`rlhf_lib.bench_shapes`): ``default`` is the workload above, ``seed`` the seed profile's
(GPT-2 124M sizes, random weights, batch 64, 4 minibatches, 64-token responses; reference configuration
``ours-seed``); bench.json's ``gpu`` section holds the figures a GPU run is read for.
Device auto: CUDA with bf16 when present, else CPU. Output: a table on stdout, ``<out>/bench.json`` and
``<out>/bench.png`` (the table as a figure: :func:`rlhf_lib.plots.plot_bench`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import bench_shapes
from .runs import repo_root

RESULT_MARKER = "BENCH_RESULT "
DEFAULT_CONFIGS = (
    "ours-default",
    "ours-lora-bf16",
    "ours-default-compile-generation",
    "ours-full-fp32",
    "rm",
    "rm-compile",
)
PROFILE = "params/default.yaml"  # every ours-* configuration starts from this profile's ppo (and common) settings
REFERENCE_CONFIG = "ours-default"  # the configuration the *_ratio_vs_trl keys compare: exactly the default profile's
FULL_FT_LR = 1e-5  # full fine-tuning learning rate on both sides (LoRA configs keep the profile's)
# name -> PPOConfig fields changed from the default profile's (the workload fields come from BenchSpec)
PPO_CONFIGS: dict[str, dict[str, Any]] = {
    "ours-default": {},
    "ours-lora-bf16": {"dtype": "bfloat16", "torch_compile": False},
    "ours-default-compile-generation": {"compile_generation": True},
    "ours-default-top15": {"trainable_top_layers": 15},
    "ours-full-fp32": {"use_lora": False, "dtype": "float32", "torch_compile": False, "learning_rate": FULL_FT_LR},
    "ours-full-bf16": {"use_lora": False, "dtype": "bfloat16", "torch_compile": False, "learning_rate": FULL_FT_LR},
    "ours-lora-fp32": {"dtype": "float32", "torch_compile": False},
}
RM_CONFIGS = {"rm": False, "rm-compile": True}  # name -> torch_compile
KNOWN_CONFIGS = (*PPO_CONFIGS, *RM_CONFIGS)
TRL_CONFIG_NAME = "trl-1.12-full-fp32"
TRL_ENV = ".venv-trl112"
TRL_REQUIREMENTS = (
    "torch==2.13.0",
    "trl==1.12.0",
    "transformers==5.23.0",
    "accelerate==1.15.0",
    "peft==0.21.2",
    "datasets==5.2.0",
)
# TRL 1.12 on this workload, 2 threads, fp32, CPU shared with another job, as published with issue 6: +-30 %
PUBLISHED_TRL = {
    "source": "published with issue 6 (TRL 1.12, CPU, 2 threads, fp32, contended machine, +-30 %), "
    "not measured in this run",
    "episodes_per_s": 0.30,
    "s_per_update": 27.0,
    "generation_s": 3.5,
    "rollout_s": 6.5,
    "optimization_s": 20.0,
    "peak_rss_gib": 7.8,
}
# the workload the published figures describe: the published ratios are given only for it
PUBLISHED_WORKLOAD = {
    "model": "bundled:smollm2-135m-instruct",
    "batch_size": 8,
    "response_length": 48,
    "num_ppo_epochs": 4,
    "num_mini_batches": 1,
}
PROMPT_SUBJECTS = (
    "headphones",
    "coffee maker",
    "novel",
    "hiking boots",
    "laptop",
    "sci-fi film",
    "pizza place",
    "board game",
    "tent",
    "phone",
    "bicycle",
    "museum",
)
DIFFERENCES = {
    "ours-default": "The default profile's PPO settings: LoRA r16 on policy and value (q_proj, v_proj) instead of "
    "full fine-tuning; reference = policy with adapter off, reward = value model with adapter off (2 "
    "base copies instead of 4); dtype auto (bf16 autocast with fp32 master weights on CUDA / AMX "
    "CPUs; TRL: fp32); each transformer block and the log-prob kernels torch.compile'd where a "
    "compiler is present (ppo.torch_compile; compiling happens in the warm-up updates).",
    "ours-lora-bf16": "ours-default with bf16 autocast and eager (uncompiled) blocks and log-prob pass.",
    "ours-default-compile-generation": "ours-default with the decode step torch.compile'd over a static KV cache, "
    "LoRA factors and attention as fused reductions (ppo.compile_generation; "
    "off in the default profile: its compile takes longer than a short run saves).",
    "ours-default-top15": "ours-default with LoRA adapters in the top 15 of 30 blocks only (ppo.trainable_top_layers): "
    "every backward stops at block 16 -- less capacity than adapters in every block, so not "
    "the same algorithmic content; not the reference configuration.",
    "ours-full-fp32": "Same algorithmic content as TRL (4 full models, full fine-tuning, fp32), eager.",
    "ours-full-bf16": "Full fine-tuning as TRL, bf16 autocast with fp32 master weights (TRL: fp32), eager.",
    "ours-lora-fp32": "LoRA as ours-default, fp32 as TRL, eager.",
    "all-ours": "Exact speed-ups present in every config of ours: the rollout policy/value forward (with grad) "
    "doubles as the first PPO step's forward (TRL recomputes it); the LM head runs only on response "
    "positions; responses trimmed to the longest; fused chunked log-prob/entropy; the prompt tokens all "
    "rows share computed once per full-sequence forward (rlhf_lib.prefix); eager attention for "
    "full-sequence forwards on CPU; our own decode loop (one uniform draw per row instead of "
    "torch.multinomial's one per vocabulary entry, no generate() bookkeeping). Pad token <|endoftext|> "
    "(distinct from EOS) on both sides.",
}

# the seed shape's configurations beside the table above (rlhf_lib.bench_shapes; `--shape seed`)
PPO_CONFIGS.update(bench_shapes.SEED_PPO_CONFIGS)
DIFFERENCES.update(bench_shapes.SEED_DIFFERENCES)
KNOWN_CONFIGS = (*PPO_CONFIGS, *RM_CONFIGS)


@dataclass
class BenchSpec:
    """The workload, shared by every configuration and by the TRL driver."""

    model: str = "bundled:smollm2-135m-instruct"
    batch_size: int = 8
    response_length: int = 48
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    temperature: float = 0.7
    warmup: int = 2
    updates: int = 3
    threads: int = 2
    omp_wait_policy: str = "ACTIVE"  # OpenMP threads between parallel regions: ACTIVE spin (idle machine), PASSIVE
    #   sleep
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    rm_pairs_per_step: int = 8
    rm_sequence_length: int = 150
    probe_repeats: int = 25  # timed matmuls of the host probe before each measured process (0: no probe)
    shape: str = "default"  # the preset the workload came from (rlhf_lib.bench_shapes.SHAPES)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# pure helpers (tested)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None when either is missing or theirs is not positive."""
    if ours is None or theirs is None or not theirs > 0:
        return None
    return ours / theirs


def summarize_updates(rows: Sequence[dict[str, Any]], warmup: int, batch_size: int) -> dict[str, Any]:
    """Steady-state figures from per-update metric rows (time/* keys): warm-up rows dropped, means of the rest."""
    timed = list(rows[warmup:])
    if not timed:
        raise ValueError(f"no timed updates: {len(rows)} rows with warmup={warmup}")
    n = len(timed)
    seconds = sum(r["time/update"] for r in timed)
    gen = sum(r["time/generation"] for r in timed)
    tokens = sum(
        r["tokens"] if "tokens" in r else r["tokens_per_s"] * r["time/generation"]  # rate x time
        for r in timed
    )
    return {
        "timed_updates": n,
        "episodes_per_s": batch_size * n / seconds,
        "s_per_update": seconds / n,
        "generation_s": gen / n,
        "forward_s": sum(r["time/forward"] for r in timed) / n,
        "optimization_s": sum(r["time/optimization"] for r in timed) / n,
        "tokens_per_s": tokens / gen if gen > 0 else None,
        "response_length": sum(r.get("objective/response_length", 0.0) for r in timed) / n,
    }


# the host probe's matmuls: label -> (torch dtype, n of an (n x n) @ (n x n) product); milliseconds each
def _bf16_probe_size() -> int:
    """The bf16 probe matmul's size: 2048 where the CPU has bf16 matrix instructions; 512 where bf16 is emulated
    (an order of magnitude slower than fp32 there, so a 2048^3 product would take most of a minute)."""
    from .runtime import cpu_info

    return 2048 if cpu_info()[1] & {"amx_bf16", "avx512_bf16"} else 512


PROBE_MATMULS = {"bf16": ("bfloat16", _bf16_probe_size()), "fp32": ("float32", 1024)}


def summarize_probe(matmul_ms: dict[str, Sequence[float]], read_gib: float, read_s: Sequence[float]) -> dict[str, Any]:
    """The host probe's figures from its raw timings: matmuls per dtype (sizes: PROBE_MATMULS), a read of `read_gib`
    GiB.

    The medians are the figures to compare between runs: the same work, so a higher median means a host more
    contended for its cores, caches, memory bus and matrix units -- which a shared host's load average, counting only
    this machine's processes, does not show. ``slowdown`` = median / fastest within the probe: how much it varied
    over its few seconds. Both dtypes are timed because our runs are bf16 (AMX) and TRL's fp32, and a busy spell need
    not slow them alike.
    """
    if not read_s or not matmul_ms or not all(matmul_ms.values()):
        raise ValueError("the host probe needs at least one timing of each matmul and of the read")
    out: dict[str, Any] = {}
    for dtype, times in matmul_ms.items():
        n, ordered = PROBE_MATMULS[dtype][1], sorted(times)
        best, median = ordered[0], ordered[len(ordered) // 2]
        out[f"{dtype}_matmul"] = {
            "n": n,
            "repeats": len(ordered),
            "ms_min": round(best, 3),
            "ms_median": round(median, 3),
            "tflops_best": round(2 * n**3 / best / 1e9, 3),
            "slowdown": round(median / best, 3),
        }
    out["read_gb_s_best"] = round(read_gib * 2**30 / min(read_s) / 1e9, 2)
    return out


def merge_rounds(results: Sequence[dict[str, Any]], warmup: int, batch_size: int) -> dict[str, Any]:
    """One configuration measured in several rounds -> one result over all their timed updates (RM: steps).

    The figures are recomputed from every round's timed updates pooled (each round drops its own warm-up), the
    peak RSS is the largest; ``rounds`` keeps each round's own episodes/s (RM: pairs/s), s/update and RSS. A failed
    round makes the merged result that failure.
    """
    if len(results) == 1:
        return dict(results[0])
    failed = [r for r in results if "error" in r]
    if failed:
        return {**failed[0], "rounds": [{"error": r["error"]} if "error" in r else {} for r in results]}
    merged = dict(results[-1])
    if "updates" in merged:  # PPO, ours or TRL
        rows = [row for r in results for row in r["updates"][warmup:]]
        merged.update(summarize_updates(rows, 0, batch_size))
        merged["updates"] = [row for r in results for row in r["updates"]]
        keys = ("episodes_per_s", "s_per_update", "peak_rss_gib", "host_probe_before")
    else:  # reward-model stage: mean seconds per step over the rounds
        s_per_step = sum(r["s_per_step"] for r in results) / len(results)
        merged.update(s_per_step=s_per_step, pairs_per_s=merged["pairs_per_step"] / s_per_step)
        keys = ("pairs_per_s", "s_per_step", "peak_rss_gib", "host_probe_before")
    merged["peak_rss_gib"] = max(r["peak_rss_gib"] for r in results)
    merged["rounds"] = [{k: r.get(k) for k in keys} for r in results]
    return merged


def parse_result(stdout: str) -> dict[str, Any]:
    """The JSON payload of the last result line in a worker's stdout (marker line, else the last JSON line)."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no result line in the worker's output")


def add_ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Fill the ratio keys: vs TRL measured in this run (None when not run) and vs TRL's published figures."""
    ref = report["configs"].get(report["reference_config"]) or {}
    trl = report.get("trl") or {}
    trl_ok = bool(trl) and "error" not in trl
    report["episodes_per_s_ratio_vs_trl"] = (
        ratio(ref.get("episodes_per_s"), trl.get("episodes_per_s")) if trl_ok else None
    )
    report["peak_rss_ratio_vs_trl"] = ratio(ref.get("peak_rss_gib"), trl.get("peak_rss_gib")) if trl_ok else None
    # on a GPU the memory that binds is the device's: torch.cuda.max_memory_allocated on both sides (None on CPU)
    report["peak_gpu_ratio_vs_trl"] = ratio(ref.get("peak_gpu_gib"), trl.get("peak_gpu_gib")) if trl_ok else None
    pub = report["published_trl"]
    comparable = all(report["workload"].get(k) == v for k, v in PUBLISHED_WORKLOAD.items())
    report["episodes_per_s_ratio_vs_published_trl"] = (
        ratio(ref.get("episodes_per_s"), pub["episodes_per_s"]) if comparable else None
    )
    report["peak_rss_ratio_vs_published_trl"] = (
        ratio(ref.get("peak_rss_gib"), pub["peak_rss_gib"]) if comparable else None
    )
    ref_rounds, trl_rounds = ref.get("rounds") or [], trl.get("rounds") or []
    report["episodes_per_s_ratio_vs_trl_by_round"] = (
        [ratio(a.get("episodes_per_s"), b.get("episodes_per_s")) for a, b in zip(ref_rounds, trl_rounds)]
        if trl_ok and len(ref_rounds) == len(trl_rounds) > 1
        else None
    )
    for res in report["configs"].values():
        if "episodes_per_s" in res:
            res["episodes_per_s_vs_trl"] = (
                ratio(res.get("episodes_per_s"), trl.get("episodes_per_s")) if trl_ok else None
            )
            res["peak_rss_vs_trl"] = ratio(res.get("peak_rss_gib"), trl.get("peak_rss_gib")) if trl_ok else None
    return report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_COLUMNS = (  # (header, key, digits)
    ("config", "name", 0),
    ("ep/s", "episodes_per_s", 3),
    ("s/update", "s_per_update", 1),
    ("gen s", "generation_s", 1),
    ("fwd s", "forward_s", 1),
    ("opt s", "optimization_s", 1),
    ("gen tok/s", "tokens_per_s", 0),
    ("peak RSS GiB", "peak_rss_gib", 2),
    ("peak GPU GiB", "peak_gpu_gib", 2),
    ("ep/s x TRL", "episodes_per_s_vs_trl", 2),
    ("RSS x TRL", "peak_rss_vs_trl", 2),
)


def ppo_results(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The PPO results of a report in the order they are shown: our configurations, then TRL's (named) if run."""
    rows = [r for r in report["configs"].values() if r.get("kind") == "ppo"]
    if report.get("trl"):
        rows.append({**report["trl"], "name": report["trl"].get("name", TRL_CONFIG_NAME)})
    return rows


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of the PPO configurations (+ TRL), the RM stage line and the headline ratios."""
    rows = [r for r in ppo_results(report) if "episodes_per_s" in r or "error" in r]
    lines = [
        "| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('name')} | failed: {r['error'][:80]} |")
            continue
        lines.append(
            "| " + " | ".join(_fmt(r.get(k), d) if k != "name" else str(r.get(k)) for _, k, d in TABLE_COLUMNS) + " |"
        )
    for rm_name in RM_CONFIGS:
        rm = report["configs"].get(rm_name)
        if not rm:
            continue
        if "error" in rm:
            lines.append(f"\n{rm_name} (RewardTrainer): failed: {rm['error'][:200]}")
        else:
            lines.append(
                f"\n{rm_name} (RewardTrainer, {rm.get('setup')}): {_fmt(rm.get('pairs_per_s'), 2)} pairs/s, "
                f"{_fmt(rm.get('s_per_step'), 2)} s/step of {rm.get('pairs_per_step')} pairs "
                f"(~{rm.get('mean_sequence_tokens')} tokens/sequence), peak RSS {_fmt(rm.get('peak_rss_gib'))} GiB"
            )
    probes = probe_line(report)
    if probes:
        lines.append("\n" + probes)
    ref = report["reference_config"]
    if report.get("episodes_per_s_ratio_vs_trl") is not None:
        lines.append(
            f"\n{ref} vs TRL 1.12 measured in this run: episodes/s x{_fmt(report['episodes_per_s_ratio_vs_trl'])}, "
            f"peak RSS x{_fmt(report['peak_rss_ratio_vs_trl'])}"
            + (
                f", peak GPU memory x{_fmt(report['peak_gpu_ratio_vs_trl'])}"
                if report.get("peak_gpu_ratio_vs_trl") is not None
                else ""
            )
        )
        if report.get("episodes_per_s_ratio_vs_trl_by_round"):
            lines.append(
                "episodes/s ratio of each round (ours and TRL taking turns): "
                + ", ".join(f"x{_fmt(r)}" for r in report["episodes_per_s_ratio_vs_trl_by_round"])
            )
    else:
        lines.append("\nTRL 1.12 not measured in this run (--trl runs it); ratios in JSON: null")
    if report.get("episodes_per_s_ratio_vs_published_trl") is None:
        lines.append("(no ratio vs TRL's published figures: this workload differs from the published one)")
        return "\n".join(lines)
    lines.append(
        f"{ref} vs TRL 1.12's PUBLISHED figures ({report['published_trl']['episodes_per_s']} ep/s, "
        f"{report['published_trl']['peak_rss_gib']} GiB; not this run): episodes/s "
        f"x{_fmt(report.get('episodes_per_s_ratio_vs_published_trl'))}, peak RSS "
        f"x{_fmt(report.get('peak_rss_ratio_vs_published_trl'))}"
    )
    return "\n".join(lines)


def probe_line(report: dict[str, Any]) -> str:
    """The host probe's matmul times before each measured process, in the order they ran ('' if none)."""
    runs = ppo_results(report)

    def times(probe: dict[str, Any]) -> str:
        return " / ".join(
            f"{_fmt(m.get('ms_median'), 1)} ({_fmt(m.get('ms_min'), 1)})"
            for m in (probe.get(f"{d}_matmul") or {} for d in PROBE_MATMULS)
        )

    parts = []
    for r in runs:
        rounds = r.get("rounds") or [r]
        parts += [
            f"{r['name']}{f' r{i}' if len(rounds) > 1 else ''} {times(p)}"
            for i, p in ((i, x.get("host_probe_before")) for i, x in enumerate(rounds, 1))
            if p and "error" not in p
        ]
    if not parts:
        return ""
    sizes = " / ".join(f"{d} {n}^3" for d, (_, n) in PROBE_MATMULS.items())
    return (
        f"host probe before each run, median (fastest) ms of a {sizes} matmul -- the same work, so higher means "
        "a more contended host: " + "; ".join(parts)
    )


def bench_messages() -> list[list[dict[str, str]]]:
    """The benchmark's prompts (chat messages), the same on both sides."""
    return [[{"role": "user", "content": f"Write a short review of a {s}."}] for s in PROMPT_SUBJECTS]


def bench_prompts(tokenizer) -> list[list[int]]:
    """Prompt token ids with the chat template's generation prompt, exactly what both trainers condition on."""
    return [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
        for m in bench_messages()
    ]


def parse_configs(text: str) -> list[str]:
    """Comma-separated configuration names, checked against the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in KNOWN_CONFIGS]
    if bad or not names:
        raise ValueError(f"--configs: unknown {bad or names}; choose from {', '.join(KNOWN_CONFIGS)}")
    return names


# ----------------------------------------------------------------------------------------------------------------
# workers (each runs in its own subprocess)


def _peak_gpu_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def profile_ppo_fields(profile: str | Path = PROFILE) -> dict[str, Any]:
    """The PPOConfig fields a params profile gives its PPO stage (common + ppo sections, resolved), less the ones
    that name the run rather than the training (run, outputs_dir, overwrite, resume)."""
    from . import config

    fields = config.stage_parameters(config.load_params_file(repo_root() / profile), "ppo")
    return {k: v for k, v in fields.items() if k not in ("run", "outputs_dir", "overwrite", "resume")}


def ppo_config(name: str, spec: BenchSpec):
    """The PPOConfig of configuration `name`: the default profile's, changed as PPO_CONFIGS says, on the workload."""
    from . import ppo

    fields = (
        profile_ppo_fields()
        | PPO_CONFIGS[name]
        | {
            "model": spec.model,
            "reward_model": spec.model,
            "device": spec.device,
            "threads": spec.threads,
            "seed": spec.seed,
            "batch_size": spec.batch_size,
            "total_episodes": spec.batch_size * (spec.warmup + spec.updates),
            "response_length": spec.response_length,
            "num_ppo_epochs": spec.num_ppo_epochs,
            "num_mini_batches": spec.num_mini_batches,
            "temperature": spec.temperature,
            "save_every": 0,
            "sample_every": 0,
        }
    )
    if spec.compile:
        fields["torch_compile"] = True
    return ppo.PPOConfig(**fields)


def make_ppo_trainer(name: str, spec: BenchSpec, scratch: Path):
    """Our PPOTrainer for configuration `name` on the workload (threads and seed set), writing under `scratch`.

    Shared by :func:`run_ppo_config` and the A/B scripts in ``scripts/``, so they measure the same setup.
    """
    from . import models, ppo, runtime
    from .policy_models import build_models

    cfg = ppo_config(name, spec)
    runtime.set_threads(spec.threads)
    runtime.seed_everything(spec.seed)
    tokenizer = models.load_tokenizer(spec.model)
    built = build_models(cfg, tokenizer, spec.model, None)
    return ppo.PPOTrainer(
        cfg,
        tokenizer,
        built.policy,
        built.ref_policy,
        built.value,
        built.reward_fn,
        bench_prompts(tokenizer),
        scratch / "ppo",
        scratch / "checkpoints",
    )


def run_ppo_config(name: str, spec: BenchSpec) -> dict[str, Any]:
    """Our PPOTrainer on the workload; figures from its per-update metrics."""
    from . import ppo, runtime
    from .metrics import read_jsonl

    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as scratch:
        trainer = make_ppo_trainer(name, spec, Path(scratch))
        cfg = trainer.cfg
        trainer.train()
        rows = read_jsonl(Path(scratch) / "ppo" / "metrics.jsonl")
    out = summarize_updates(rows, spec.warmup, spec.batch_size)
    out.update(
        {
            "name": name
            + ("+compile" if spec.compile and not (profile_ppo_fields() | PPO_CONFIGS[name])["torch_compile"] else ""),
            "kind": "ppo",
            "use_lora": cfg.use_lora,
            "dtype": str(trainer.dtype).replace("torch.", ""),
            "device": runtime.describe_device(trainer.device),
            "learning_rate": cfg.learning_rate,
            "warmup_updates": spec.warmup,
            "compile": trainer.compiled,
            "compile_generation": trainer.sampler.compile,
            "trainable_top_layers": cfg.trainable_top_layers,
            "peak_rss_gib": ppo.peak_rss_gib(),
            "peak_gpu_gib": _peak_gpu_gib(),
            "trainable_parameters": sum(p.numel() for p in trainer.trainable),
            "updates": [
                {
                    k: r[k]
                    for k in (
                        "update",
                        "time/update",
                        "time/generation",
                        "time/forward",
                        "time/optimization",
                        "tokens_per_s",
                        "objective/response_length",
                    )
                }
                for r in rows
            ],
        }
    )
    return out


def synthetic_pairs(tokenizer, n: int, length: int, seed: int) -> list[dict[str, Any]]:
    """Preference pairs of ~`length` tokens per sequence: a real chat prompt + random response tokens (+ EOS)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = bench_prompts(tokenizer)
    low = max(tokenizer.all_special_ids) + 1  # ordinary tokens only: never the pad id
    rows = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        budget = max(length - len(prompt), 2)  # response tokens, spread +-20 % around the budget
        sizes = rng.integers(int(0.8 * budget), int(1.2 * budget) + 1, size=2)
        chosen, rejected = (
            rng.integers(low, len(tokenizer), size=int(s) - 1).tolist() + [tokenizer.eos_token_id] for s in sizes
        )
        rows.append({"id": str(i), "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def run_reward_config(name: str, spec: BenchSpec) -> dict[str, Any]:
    """RewardTrainer steps with the default RewardModelConfig (as the reward_model stage builds it), synthetic pairs."""
    from transformers import TrainerCallback
    from trl import RewardTrainer

    from . import models, reward, runtime

    runtime.set_threads(spec.threads)
    runtime.seed_everything(spec.seed)
    cfg = reward.RewardModelConfig(
        model=spec.model,
        device=spec.device,
        seed=spec.seed,
        threads=spec.threads,
        per_device_train_batch_size=spec.rm_pairs_per_step,
        logging_steps=1000,
        torch_compile=RM_CONFIGS[name] or spec.compile,
    )
    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    tokenizer = models.load_tokenizer(cfg.model)
    warmup = max(spec.warmup, 1)  # the first step's end is the timing origin
    steps = warmup + spec.updates
    rows = synthetic_pairs(tokenizer, steps * cfg.per_device_train_batch_size, spec.rm_sequence_length, spec.seed)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            ends.append(time.perf_counter())

    model = reward._build_model(cfg, tokenizer, device)
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-rm-") as scratch:
        args = reward._reward_config(cfg, device, dtype, scratch, has_eval=False)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=reward._pairs_dataset(rows),
            processing_class=tokenizer,
            optimizers=(reward._optimizer(cfg, model), None),
            callbacks=[Clock()],
        )
        trainer.train()
    timed = len(ends) - warmup
    seconds = ends[-1] - ends[warmup - 1]
    lengths = [len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
    return {
        "name": name,
        "kind": "reward_model",
        "compile": cfg.torch_compile,
        "setup": "default RewardModelConfig: "
        f"{'LoRA r%d %s' % (cfg.lora_r, ','.join(cfg.lora_target_modules)) if cfg.use_lora else 'full'}, "
        f"{str(dtype).replace('torch.', '')}, batch {cfg.per_device_train_batch_size}",
        "dtype": str(dtype).replace("torch.", ""),
        "device": runtime.describe_device(device),
        "pairs_per_step": cfg.per_device_train_batch_size,
        "warmup_steps": warmup,
        "timed_steps": timed,
        "mean_sequence_tokens": round(sum(lengths) / len(lengths)),
        "pairs_per_s": cfg.per_device_train_batch_size * timed / seconds,
        "s_per_step": seconds / timed,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gib": _peak_gpu_gib(),
    }


PROBE_WORKER = "host-probe"


def run_host_probe(spec: BenchSpec, read_gib: float = 0.25) -> dict[str, Any]:
    """Time fixed bf16 and fp32 matmuls `spec.probe_repeats` times each (taking turns, 0.1 s apart) and a streaming
    read, on the CPU.

    The same work takes longer at times on a shared host; recorded before every measured process so a reader of
    bench.json can tell a quiet run from a contended one (see :func:`summarize_probe`).
    """
    import torch

    torch.set_num_threads(spec.threads)
    gen = torch.Generator().manual_seed(0)
    operands = {
        name: torch.randn(n, n, generator=gen).to(getattr(torch, dtype)) for name, (dtype, n) in PROBE_MATMULS.items()
    }
    for a in operands.values():
        for _ in range(3):  # warm-up: oneDNN's kernel selection, page faults
            a @ a
    matmul_ms: dict[str, list[float]] = {name: [] for name in operands}
    for _ in range(spec.probe_repeats):
        for name, a in operands.items():
            start = time.perf_counter()
            a @ a
            matmul_ms[name].append((time.perf_counter() - start) * 1e3)
        time.sleep(0.1)  # spread over a few seconds: slow spells come and go
    big = torch.ones(int(read_gib * 2**30) // 2, dtype=torch.bfloat16)
    read_s = []
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        read_s.append(time.perf_counter() - start)
    return summarize_probe(matmul_ms, read_gib, read_s)


def probe_host(spec: BenchSpec, timeout: float = 120) -> dict[str, Any] | None:
    """:func:`run_host_probe` in a subprocess with the measured processes' environment; None when disabled."""
    if spec.probe_repeats < 1:
        return None
    cmd = [sys.executable, "-m", "rlhf_lib.bench", "--worker", PROBE_WORKER, "--spec", json.dumps(asdict(spec))]
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=child_env(spec.threads, spec.omp_wait_policy),
            cwd=repo_root(),
            timeout=timeout,
        )
        if done.returncode != 0:
            return {"error": f"exit status {done.returncode}: {done.stderr.strip()[-300:]}"}
        return parse_result(done.stdout)
    except (subprocess.TimeoutExpired, ValueError) as exc:
        return {"error": str(exc)}


def worker_main(name: str, spec: BenchSpec) -> None:
    """Entry point of a worker subprocess: run one configuration (or the host probe), print its result line."""
    if name == PROBE_WORKER:
        result = run_host_probe(spec)
    else:
        result = run_reward_config(name, spec) if name in RM_CONFIGS else run_ppo_config(name, spec)
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the driver


def child_env(threads: int, omp_wait_policy: str) -> dict[str, str]:
    """Environment of a measured subprocess (TRL's too): thread count and OpenMP wait policy.

    Decoding a small batch runs thousands of tiny parallel regions per step; with PASSIVE waits the second thread
    sleeps between them and is woken by the kernel each time, which makes decoding slower on an idle machine.
    ACTIVE busy-waits instead, which is right on an idle machine and slows everything down when another process
    wants the same cores -- hence PASSIVE for `make pipeline` / `make test` on shared machines.
    """
    env = dict(os.environ)
    env.pop("GOMP_SPINCOUNT", None)  # the policy alone decides how long idle threads spin
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": omp_wait_policy,
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def run_subprocess(cmd: list[str], spec: BenchSpec, log_path: Path, timeout: float) -> dict[str, Any]:
    """Run `cmd`, stdout to `log_path`, stderr through; returns the result plus the child's own peak RSS and the
    host probe taken just before it."""
    probe = probe_host(spec)
    load_before = os.getloadavg()
    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        env = child_env(spec.threads, spec.omp_wait_policy)
        proc = subprocess.Popen(cmd, stdout=log, stderr=None, env=env, cwd=repo_root())
        while True:  # os.wait4: this child's rusage (peak RSS of this configuration alone)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = log_path.read_text(encoding="utf-8")
    meta = {
        "wall_s": time.perf_counter() - start,
        "child_peak_rss_gib": usage.ru_maxrss / 2**20,
        # kernel time and page faults of the whole process (warm-up and compiling included): allocator effects
        "child_cpu_user_s": round(usage.ru_utime, 2),
        "child_cpu_sys_s": round(usage.ru_stime, 2),
        "child_minor_page_faults": usage.ru_minflt,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": shlex.join(cmd),
        "log": str(log_path),
        "host_probe_before": probe,
    }
    if proc.returncode != 0:
        tail = "\n".join(stdout.splitlines()[-5:])
        return {"error": f"exit status {proc.returncode} (see {log_path} and stderr above): {tail}", **meta}
    try:
        return {**parse_result(stdout), **meta}
    except ValueError as exc:
        return {"error": str(exc), **meta}


def trl_python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def ensure_trl_env(env_dir: Path) -> Path:
    """Create the separate TRL 1.12 virtualenv once (pip from the registry); returns its python."""
    python = trl_python(env_dir)
    stamp = env_dir / ".rlhf-bench-installed"
    if stamp.exists() and python.exists():
        return python
    print(f"creating {env_dir} with {' '.join(TRL_REQUIREMENTS)} (once; a few minutes)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], check=True)
    stamp.write_text(" ".join(TRL_REQUIREMENTS) + "\n")
    return python


def run_trl(spec: BenchSpec, out_dir: Path, env_dir: Path, timeout: float, logs: Path | None = None) -> dict[str, Any]:
    """TRL 1.12's PPOTrainer on the same workload in its own environment and subprocess."""
    from . import models

    try:
        python = ensure_trl_env(env_dir)
    except (subprocess.CalledProcessError, OSError) as exc:
        return {"name": TRL_CONFIG_NAME, "error": f"could not create {env_dir}: {exc}"}
    tokenizer = models.load_tokenizer(spec.model)
    prompts_file = out_dir / "trl_prompts.json"
    prompts_file.write_text(json.dumps(bench_prompts(tokenizer)))
    cmd = [
        str(python),
        str(repo_root() / "scripts" / "bench_trl112.py"),
        "--model-dir",
        models.resolve_model_ref(spec.model),
        "--prompts",
        str(prompts_file),
        "--pad-token",
        tokenizer.pad_token,
        "--batch-size",
        str(spec.batch_size),
        "--response-length",
        str(spec.response_length),
        "--num-ppo-epochs",
        str(spec.num_ppo_epochs),
        "--num-mini-batches",
        str(spec.num_mini_batches),
        "--temperature",
        str(spec.temperature),
        "--learning-rate",
        str(FULL_FT_LR),
        "--warmup",
        str(spec.warmup),
        "--updates",
        str(spec.updates),
        "--threads",
        str(spec.threads),
        "--seed",
        str(spec.seed),
        "--device",
        spec.device,
    ]
    print(f"\n== {TRL_CONFIG_NAME} ({python})", flush=True)
    result = run_subprocess(cmd, spec, (logs or out_dir / "logs") / f"{TRL_CONFIG_NAME}.log", timeout)
    result.setdefault("name", TRL_CONFIG_NAME)
    return result


def run_benchmark(
    configs: Sequence[str],
    spec: BenchSpec,
    out_dir: Path,
    with_trl: bool,
    trl_env: Path,
    timeout: float,
    rounds: int = 1,
) -> dict[str, Any]:
    """Every configuration in its own subprocess, then TRL (optional), `rounds` times over (ours and TRL take turns,
    so a slow spell of a shared machine falls on both); returns the report (also written to JSON)."""
    from . import runtime
    from .runs import package_versions, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    device = runtime.pick_device(spec.device)
    report: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "rlhf_lib.bench", *sys.argv[1:]]),
        "device": runtime.describe_device(device) | {"torch_threads": spec.threads},
        "threads": spec.threads,
        "omp_wait_policy": spec.omp_wait_policy,
        "rounds": rounds,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "workload": {k: v for k, v in asdict(spec).items() if k != "extra"}
        | {
            "models": "policy + reference + reward + value from the same checkpoint; reward/value score head is a "
            "random initialisation (from_pretrained num_labels=1)",
            "prompts": len(PROMPT_SUBJECTS),
            "full_fine_tuning_learning_rate": FULL_FT_LR,
        },
        "reference_config": bench_shapes.reference_config(spec.shape, REFERENCE_CONFIG),
        "differences": DIFFERENCES,
        "versions": package_versions(),
        "configs": {},
        "trl": None,
        "published_trl": PUBLISHED_TRL,
    }
    spec_json = json.dumps(asdict(spec))
    per_round: dict[str, list[dict[str, Any]]] = {}
    for round_index in range(rounds):
        logs = out_dir / "logs" / (f"round{round_index + 1}" if rounds > 1 else "")
        for name in configs:
            print(f"\n== {name}" + (f" (round {round_index + 1}/{rounds})" if rounds > 1 else ""), flush=True)
            cmd = [sys.executable, "-m", "rlhf_lib.bench", "--worker", name, "--spec", spec_json]
            result = run_subprocess(cmd, spec, logs / f"{name}.log", timeout)
            result.setdefault("name", name)
            result.setdefault("kind", "reward_model" if name in RM_CONFIGS else "ppo")
            per_round.setdefault(name, []).append(result)
        if with_trl:
            per_round.setdefault(TRL_CONFIG_NAME, []).append(run_trl(spec, out_dir, trl_env, timeout, logs))
    for name, results in per_round.items():
        merged = merge_rounds(results, spec.warmup, spec.batch_size)
        if name == TRL_CONFIG_NAME:
            report["trl"] = merged
        else:
            report["configs"][name] = merged
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    add_ratios(report)
    report["gpu"] = bench_shapes.gpu_section(report)
    write_json_atomic(out_dir / "bench.json", report)
    return report


def spec_for_shape(shape: str, **given: Any) -> BenchSpec:
    """The BenchSpec of a shape (rlhf_lib.bench_shapes.SHAPES), with the `given` fields that are not None on top."""
    return BenchSpec(
        **{**bench_shapes.shape_fields(shape), "shape": shape, **{k: v for k, v in given.items() if v is not None}}
    )


def shape_configs(shape: str) -> tuple[str, ...]:
    """The configurations a shape measures by default (the seed shape: its reference, TRL's content, LoRA)."""
    return bench_shapes.SEED_CONFIGS if shape == "seed" else DEFAULT_CONFIGS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlhf_lib.bench", description=__doc__.split("\n")[0])
    p.add_argument("--updates", type=int, default=3, help="timed PPO updates (and timed RM steps) per configuration")
    p.add_argument("--warmup", type=int, default=2, help="warm-up updates run first and excluded from the figures")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads of every measured process")
    p.add_argument(
        "--omp-wait-policy",
        default=BenchSpec.omp_wait_policy,
        choices=("ACTIVE", "PASSIVE"),
        help="OMP_WAIT_POLICY of every measured process, TRL's too: ACTIVE (spinning threads, for an idle "
        "machine) or PASSIVE (sleeping threads, safe when other jobs share the cores)",
    )
    p.add_argument(
        "--shape",
        default="default",
        choices=tuple(bench_shapes.SHAPES),
        help="workload preset: default (SmolLM2, batch 8) or seed (the seed profile's PPO: GPT-2-sized, "
        "batch 64, 4 minibatches, 64-token responses); the flags below override its fields",
    )
    p.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated, of {', '.join(KNOWN_CONFIGS)} (default: the shape's own list)",
    )
    p.add_argument("--trl", action="store_true", help=f"also run TRL 1.12's PPOTrainer in {TRL_ENV} (created once)")
    p.add_argument("--trl-env", default=TRL_ENV, help="folder of the TRL 1.12 virtualenv")
    p.add_argument("--out", default="outputs/bench", help="folder for bench.json and the worker logs")
    p.add_argument(
        "--model",
        default=None,
        help="model reference (all four roles; default: the shape's, e.g. "
        "tiny:gpt2 for a CPU dry run of the seed shape)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA + bf16 when present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--response-length", type=int, default=None)
    p.add_argument("--num-ppo-epochs", type=int, default=None)
    p.add_argument("--num-mini-batches", type=int, default=None)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (ppo.torch_compile / reward_model.torch_compile)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every configuration (and TRL) this many times, "
        "taking turns, and pool the timed updates (a shared machine's slow spells fall on both sides)",
    )
    p.add_argument(
        "--probe-repeats",
        type=int,
        default=BenchSpec.probe_repeats,
        help="timed matmuls of the host probe run before each measured process (0: no probe)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a configuration's process is killed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, BenchSpec(**json.loads(args.spec)))
        return None
    try:
        configs = parse_configs(args.configs or ",".join(shape_configs(args.shape)))
    except ValueError as exc:
        raise SystemExit(str(exc))
    if args.updates < 1 or args.warmup < 0 or args.threads < 1 or args.rounds < 1 or args.probe_repeats < 0:
        raise SystemExit("--updates and --rounds must be >= 1, --warmup and --probe-repeats >= 0, --threads >= 1")
    spec = spec_for_shape(
        args.shape,
        model=args.model,
        batch_size=args.batch_size,
        response_length=args.response_length,
        num_ppo_epochs=args.num_ppo_epochs,
        num_mini_batches=args.num_mini_batches,
        warmup=args.warmup,
        updates=args.updates,
        threads=args.threads,
        omp_wait_policy=args.omp_wait_policy,
        device=args.device,
        compile=args.compile,
        probe_repeats=args.probe_repeats,
    )
    spec.model = bench_shapes.ensure_seed_model(spec.model)
    root = repo_root()
    out_dir = Path(args.out) if Path(args.out).is_absolute() else root / args.out
    trl_env = Path(args.trl_env) if Path(args.trl_env).is_absolute() else root / args.trl_env
    report = run_benchmark(configs, spec, out_dir, args.trl, trl_env, args.timeout, args.rounds)
    print("\n" + format_table(report))
    from .plots import plot_bench, save_figure_in

    png = save_figure_in(plot_bench(report), out_dir, "bench")
    print(
        f"\nwrote {png} and {out_dir / 'bench.json'} (device {report['device']}, threads {spec.threads}, load average "
        f"{report['load_average_start']} -> {report['load_average_end']})"
    )
    return report


if __name__ == "__main__":
    main()
