"""What runs inside one measured subprocess of `make bench` (``python -m rlhf_lib.bench --worker NAME``): our
PPOTrainer on the workload, RewardTrainer steps on synthetic pairs, or the host probe; the result is printed as one
``BENCH_RESULT`` line for the driver (rlhf_lib.bench.cli) to read.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from rlhf_lib.bench.configs import (
    PPO_CONFIGS,
    PROBE_MATMULS,
    RM_CONFIGS,
    BenchSpec,
    bench_prompts,
    ppo_config,
    profile_ppo_fields,
)
from rlhf_lib.bench.report import summarize_probe, summarize_updates

RESULT_MARKER = "BENCH_RESULT "


def _peak_gpu_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def make_ppo_trainer(name: str, spec: BenchSpec, scratch: Path):
    """Our PPOTrainer for configuration `name` on the workload (threads and seed set), writing under `scratch`.

    Shared by :func:`run_ppo_config` and the A/B scripts in ``scripts/``, so they measure the same setup.
    """
    from rlhf_lib.core import runtime
    from rlhf_lib.lm import models
    from rlhf_lib.lm.policy_models import build_models
    from rlhf_lib.ppo import trainer as ppo

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
    from rlhf_lib.core import runtime
    from rlhf_lib.ppo import trainer as ppo
    from rlhf_lib.ppo.metrics import read_jsonl

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

    from rlhf_lib.core import runtime
    from rlhf_lib.lm import models
    from rlhf_lib.reward import train as reward

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

    model = reward.build_reward_model(cfg, tokenizer, device)
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-rm-") as scratch:
        dataset = reward.pairs_dataset(rows)
        trainer = reward.reward_trainer(cfg, model, tokenizer, device, dtype, dataset, scratch, callbacks=[Clock()])
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


def worker_main(name: str, spec: BenchSpec) -> None:
    """Entry point of a worker subprocess: run one configuration (or the host probe), print its result line."""
    if name == PROBE_WORKER:
        result = run_host_probe(spec)
    else:
        result = run_reward_config(name, spec) if name in RM_CONFIGS else run_ppo_config(name, spec)
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)
