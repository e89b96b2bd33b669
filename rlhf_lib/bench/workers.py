"""What runs inside one measured subprocess of `make bench` (``python -m rlhf_lib.bench --worker NAME``): our
PPOTrainer on the workload, the default profile's reward-model training (our loop or TRL's RewardTrainer) on
synthetic pairs, scoring those pairs with the default profile's reward model as a combined ensemble against one
member, or the host probe; the result is printed as one ``BENCH_RESULT`` line for the driver (rlhf_lib.bench.cli) to
read.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    SCORING_CONFIGS,
    BenchSpec,
    bench_prompts,
    ppo_config,
    profile_ppo_fields,
    reward_config,
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


def model_layers(ref: str) -> int:
    """The number of transformer blocks of model `ref` (its config's, without loading the weights)."""
    from transformers import AutoConfig

    from rlhf_lib.lm import models

    return AutoConfig.from_pretrained(models.resolve_model_ref(ref)).get_text_config().num_hidden_layers


def _clock(device) -> float:
    """perf_counter once the device's queued work is done (CUDA runs asynchronously)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _trained(model, seconds: float, steps: int, pairs: int, cached_trunk_blocks: int) -> dict[str, Any]:
    """What a timed training reports, the same keys for both trainers."""
    from rlhf_lib.lm import models

    return {
        "seconds": seconds,
        "steps": steps,
        "pairs": pairs,
        "cached_trunk_blocks": cached_trunk_blocks,
        "blocks": len(models.transformer_blocks(model)),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def train_ours(cfg, tokenizer, rows, device, dtype) -> dict[str, Any]:
    """The stage's loop as train_reward_model runs it on a fresh model (seeded): the pairs' scorer (the frozen trunk
    run once, where it is cached) and the epochs, timed together."""
    from rlhf_lib.core import runtime
    from rlhf_lib.reward import train as reward
    from rlhf_lib.reward.fit import fit_reward_model, training_scorers

    runtime.seed_everything(cfg.seed)
    model = reward.build_reward_model(cfg, tokenizer, device)
    optimizer = reward.reward_optimizer(cfg, model)
    start = _clock(device)
    score, _ = training_scorers(cfg, model, rows, tokenizer.pad_token_id, device, dtype)
    if score is None:
        raise ValueError(f"every synthetic pair is longer than max_length={cfg.max_length}")
    fitted = fit_reward_model(cfg, model, optimizer, score, desc="bench reward model")
    seconds = _clock(device) - start
    return _trained(model, seconds, fitted.log_history[-1]["step"], fitted.n_pairs, fitted.cached_trunk_blocks)


def train_trl(cfg, tokenizer, rows, device, dtype) -> dict[str, Any]:
    """TRL's RewardTrainer as reward.train.reward_trainer builds it, on a fresh model (seeded): train() timed."""
    from rlhf_lib.core import runtime
    from rlhf_lib.reward import train as reward

    runtime.seed_everything(cfg.seed)
    model = reward.build_reward_model(cfg, tokenizer, device)
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-rm-") as scratch:
        trainer = reward.reward_trainer(cfg, model, tokenizer, device, dtype, reward.pairs_dataset(rows), scratch)
        start = _clock(device)
        trainer.train()
        seconds = _clock(device) - start
    return _trained(model, seconds, trainer.state.global_step, len(trainer.train_dataset), 0)


RM_TRAINERS = {"rm": train_ours, "rm-trl": train_trl}  # RM_CONFIGS' names -> the training each one times


def run_reward_config(name: str, spec: BenchSpec) -> dict[str, Any]:
    """The default profile's reward-model training (RM_CONFIGS) on `spec.rm_pairs` synthetic pairs: one epoch on
    the first pairs as a warm-up (compiling happens here; not timed), then the whole training timed on a fresh model.

    Whole trainings, not steps, are timed: our loop's trunk cache is paid once per training and repaid each epoch.
    """
    from rlhf_lib.core import runtime
    from rlhf_lib.lm import models

    runtime.set_threads(spec.threads)
    tokenizer = models.load_tokenizer(spec.model)
    cfg, changed = reward_config(spec, model_layers(spec.model))
    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    rows = synthetic_pairs(tokenizer, spec.rm_pairs, spec.rm_sequence_length, spec.seed)
    warmup = rows[: spec.rm_pairs_per_step * max(spec.warmup, 1)]
    RM_TRAINERS[name](dataclasses.replace(cfg, num_train_epochs=1.0), tokenizer, warmup, device, dtype)
    timed = RM_TRAINERS[name](cfg, tokenizer, rows, device, dtype)
    return reward_result(name, cfg, changed, rows, len(warmup), timed, device, dtype)


def rm_setup(cfg, blocks: int, dtype_name: str, compiled: bool) -> str:
    """The settings an RM configuration trained with, in words (the table's line)."""
    lora = f"LoRA r{cfg.lora_r} {','.join(cfg.lora_target_modules)}" if cfg.use_lora else "full fine-tuning"
    top = f"top {cfg.trainable_top_layers} of {blocks}" if cfg.trainable_top_layers else f"all {blocks}"
    return (
        f"default profile: {lora}, {top} blocks trained, {dtype_name}, batch {cfg.per_device_train_batch_size}, "
        f"{cfg.num_train_epochs:g} epochs, {'compiled' if compiled else 'eager'}"
    )


def reward_result(name, cfg, changed, rows, warmup_pairs, timed, device, dtype) -> dict[str, Any]:
    """bench.json's entry of an RM configuration: the timed training's figures and the settings it ran with."""
    import torch

    from rlhf_lib.core import runtime
    from rlhf_lib.lm.policy_models import should_compile

    lengths = [len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
    dtype_name = str(dtype).replace("torch.", "")
    # compiled blocks ran unless no compiler was found or TORCH_COMPILE_DISABLE turned torch.compile off
    compiled = (
        should_compile(cfg.torch_compile, device, "reward_model.torch_compile") and not torch._dynamo.config.disable
    )
    return {
        "name": name,
        "kind": "reward_model",
        "trainer": RM_CONFIGS[name],
        "setup": rm_setup(cfg, timed["blocks"], dtype_name, compiled),
        "reward_model_config": dataclasses.asdict(cfg),
        "changed_for_model": changed,  # profile fields this model cannot take: field -> [profile's, used]
        "compile": compiled,
        "dtype": dtype_name,
        "device": runtime.describe_device(device),
        "use_lora": cfg.use_lora,
        "trainable_top_layers": cfg.trainable_top_layers,
        "num_train_epochs": cfg.num_train_epochs,
        "pairs_per_step": cfg.per_device_train_batch_size,
        "warmup_pairs": warmup_pairs,
        "pairs_digest": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16],
        "mean_sequence_tokens": round(sum(lengths) / len(lengths)),
        **timed,
        "pairs_per_s": timed["pairs"] * cfg.num_train_epochs / timed["seconds"],
        "s_per_step": timed["seconds"] / timed["steps"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gib": _peak_gpu_gib(),
    }


SCORING_REPEATS = 3  # timed passes of each scoring path (after one untimed warm-up of each)


def draw_member(model, seed: int, std: float = 0.02) -> None:
    """Give a peft reward model a member's non-zero adapters and head, reproducibly: peft's initialisation under
    ``seed`` (A random), then B and the head drawn (training leaves both non-zero; their values do not change the
    cost)."""
    import torch

    from rlhf_lib.reward import ensemble

    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in ensemble.lora_layers(model):
            layer.reset_lora_parameters(ensemble.ADAPTER, True)
            for b in layer.lora_B.values():
                b.weight.normal_(std=std)
        ensemble.score_head(model).weight.normal_()


def ensemble_scorers(cfg, tokenizer, members: int, seed: int, merged: int = 1):
    """``members`` drawn members of the reward model ``cfg`` builds (:func:`draw_member`, seeds seed, seed + 1, ...):
    the first ``merged`` members' own merged plain models and the MemberStack of all of them on their weight average
    (WARM, as the reward-model stage saves it), built on the CPU as load_member_stack builds it."""
    import copy

    import torch

    from rlhf_lib.reward import combined, ensemble
    from rlhf_lib.reward import train as reward

    base = reward.build_reward_model(cfg, tokenizer, torch.device("cpu"))
    names = combined.adapted_layer_names(base)
    factors, weights, plain = [], [], []
    for m in range(members):
        draw_member(base, seed + m)
        factors.append(combined.member_factors(base))
        weights.append(ensemble.member_weights(base))
        if m < merged:
            plain.append(copy.deepcopy(base).merge_and_unload().eval())
    warm = ensemble.WeightSetter(base).load(ensemble.average(weights)).eval()
    stats = [{"mean": 0.0, "std": 1.0}] * members  # standardisation does not change the cost
    stack = combined.MemberStack(warm, factors, names, stats, "mean", cfg.ensemble_uwo_coef)
    return plain, stack


def scoring_batches(rows, pad_id: int, batch_pairs: int, device) -> list[tuple[Any, Any]]:
    """prompt+chosen and prompt+rejected of every row, by length, ``2 * batch_pairs`` sequences a batch (as the
    stage's score_pairs batches them), right-padded on ``device`` once, so padding is not timed."""
    from rlhf_lib.core.io import pad

    seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
    seqs.sort(key=len)
    step = 2 * batch_pairs
    return [pad(seqs[i : i + step], pad_id, side="right", device=device) for i in range(0, len(seqs), step)]


def time_scoring(single, stack, batches, device, dtype, repeats: int) -> dict[str, Any]:
    """Seconds of scoring every batch with one member's merged model and with the MemberStack, ``repeats`` times
    each, taking turns (which goes first alternates); after one untimed warm-up of each, which also checks that
    both paths score member 0 alike."""
    import torch

    from rlhf_lib.core import runtime
    from rlhf_lib.reward.scoring import score_sequences

    def single_pass():
        return torch.cat([score_sequences(single, ids, mask) for ids, mask in batches])  # (N,)

    def ensemble_pass():
        return torch.cat([stack(ids, mask) for ids, mask in batches])  # (N,)

    def timed(fn) -> float:
        start = _clock(device)
        fn()
        return _clock(device) - start

    with runtime.autocast(device, dtype):
        alone = single_pass()
        each = torch.cat([stack.member_scores(ids, mask) for ids, mask in batches], dim=1)  # (k, N)
        ensemble_pass()
        seconds: dict[str, list[float]] = {"single": [], "ensemble": []}
        for i in range(repeats):
            order = ("single", "ensemble") if i % 2 == 0 else ("ensemble", "single")
            for which in order:
                seconds[which].append(timed(single_pass if which == "single" else ensemble_pass))
    return {
        "single_s_repeats": seconds["single"],
        "ensemble_s_repeats": seconds["ensemble"],
        "member0_max_abs_diff": float((each[0] - alone).abs().max()),  # the same member by both paths: ~0
        "member_spread": float((each - each[0]).abs().max()),  # how far the members' scores differ
    }


def run_scoring_config(name: str, spec: BenchSpec) -> dict[str, Any]:
    """Scoring `spec.rm_pairs` synthetic pairs with the default profile's reward model: one member alone against a
    `spec.rm_ensemble_members`-member ensemble combined (SCORING_CONFIGS), eager, under the profile's dtype."""
    from rlhf_lib.core import runtime
    from rlhf_lib.lm import models

    runtime.set_threads(spec.threads)
    tokenizer = models.load_tokenizer(spec.model)
    cfg, changed = reward_config(spec, model_layers(spec.model))
    cfg = dataclasses.replace(cfg, torch_compile=False)  # the MemberStack runs its blocks eager: both sides alike
    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    rows = synthetic_pairs(tokenizer, spec.rm_pairs, spec.rm_sequence_length, spec.seed)
    (single,), stack = ensemble_scorers(cfg, tokenizer, spec.rm_ensemble_members, spec.seed)
    single, stack = single.to(device), stack.to(device)
    batches = scoring_batches(rows, tokenizer.pad_token_id, cfg.per_device_eval_batch_size, device)
    timed = time_scoring(single, stack, batches, device, dtype, SCORING_REPEATS)
    return scoring_result(name, cfg, changed, stack, batches, timed, device, dtype)


def scoring_result(name, cfg, changed, stack, batches, timed, device, dtype) -> dict[str, Any]:
    """bench.json's entry of the scoring configuration: medians of the timed passes, their ratio, the block
    arithmetic it is expected to follow, and the settings."""
    import statistics

    from rlhf_lib.core import runtime
    from rlhf_lib.lm import models

    blocks, first, k = len(models.transformer_blocks(stack.model)), stack.first_block, stack.k
    sequences = sum(int(ids.shape[0]) for ids, _ in batches)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    single_s, ensemble_s = (statistics.median(timed[f"{w}_s_repeats"]) for w in ("single", "ensemble"))
    lora = f"LoRA r{cfg.lora_r} {','.join(cfg.lora_target_modules)}" if cfg.use_lora else "full fine-tuning"
    top = f"top {blocks - first} of {blocks}" if first else f"all {blocks}"
    dtype_name = str(dtype).replace("torch.", "")
    return {
        "name": name,
        "kind": "reward_scoring",
        "scorer": SCORING_CONFIGS[name],
        "setup": f"default profile: {lora}, {top} blocks adapted, {k} members, {dtype_name}, "
        f"batches of {2 * cfg.per_device_eval_batch_size} sequences, eager",
        "changed_for_model": changed,  # profile fields this model cannot take: field -> [profile's, used]
        "members": k,
        "first_member_block": first,  # blocks below it run once for all members; from it up, once per member
        "blocks": blocks,
        "sequences": sequences,
        "mean_sequence_tokens": round(tokens / sequences),
        "batch_sequences": 2 * cfg.per_device_eval_batch_size,
        "repeats": len(timed["single_s_repeats"]),
        **timed,
        "single_s": single_s,
        "ensemble_s": ensemble_s,
        "sequences_per_s_single": sequences / single_s,
        "sequences_per_s_ensemble": sequences / ensemble_s,
        "ensemble_cost_ratio": ensemble_s / single_s,
        "expected_block_ratio": (first + k * (blocks - first)) / blocks,  # block forwards, ensemble over one member
        "dtype": dtype_name,
        "device": runtime.describe_device(device),
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
    elif name in SCORING_CONFIGS:
        result = run_scoring_config(name, spec)
    else:
        result = run_reward_config(name, spec) if name in RM_CONFIGS else run_ppo_config(name, spec)
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)
