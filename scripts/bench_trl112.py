"""TRL 1.12.0's PPOTrainer on the benchmark workload; prints one JSON line (the last line of stdout).

Runs inside the separate environment ``.venv-trl112`` (trl==1.12.0, the last TRL with PPO, beside transformers 5.23),
which ``python -m rlhf_lib.bench --trl`` creates and drives; it imports nothing from rlhf_lib. The workload mirrors
ours exactly: the same model folder, the same prompt token ids (``--prompts``, a JSON list of id lists), batch size,
response length, PPO epochs, minibatches, temperature and threads; four models (policy, reference, reward, value;
the reward and value heads are the same random initialisation as ours: ``from_pretrained(num_labels=1)``), fp32
with ``bf16=False`` set explicitly (TRL's default is True).

Phase times are taken without changing TRL's code: ``batch_generation`` is wrapped (generation), the advantage
``masked_whiten`` call marks the end of the rollout (so forward = rollout - generation), and a callback's
``on_step_end`` marks the end of each update (optimisation = update end - rollout end).

    .venv-trl112/bin/python scripts/bench_trl112.py --model-dir ~/.cache/rlhf-lab/smollm2-135m-instruct \
        --prompts prompts.json --warmup 2 --updates 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help="a Hugging Face model folder (policy, ref, reward, value base)")
    p.add_argument("--prompts", required=True, help="JSON file: list of prompt token-id lists (chat template applied)")
    p.add_argument("--pad-token", default="<|endoftext|>", help="pad token when the tokenizer's pad equals EOS")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--response-length", type=int, default=48)
    p.add_argument("--num-ppo-epochs", type=int, default=4)
    p.add_argument("--num-mini-batches", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=1, help="updates run first and excluded from the figures")
    p.add_argument("--updates", type=int, default=3, help="timed updates")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present) or cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    marks: dict[str, list] = {"gen": [], "whiten": [], "step_end": [], "train_begin": []}

    original_generation, original_whiten = ppo_mod.batch_generation, ppo_mod.masked_whiten

    def timed_generation(model, queries, *rest, **kwargs):
        t0 = time.perf_counter()
        out = original_generation(model, queries, *rest, **kwargs)
        steps = out[0].shape[1] - queries.shape[1]  # decoded steps (all rows stop together or at the limit)
        marks["gen"].append((t0, time.perf_counter(), queries.shape[0] * steps))
        return out

    def timed_whiten(*a, **k):
        out = original_whiten(*a, **k)
        marks["whiten"].append(time.perf_counter())
        return out

    ppo_mod.batch_generation, ppo_mod.masked_whiten = timed_generation, timed_whiten

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["train_begin"].append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks["step_end"].append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = args.pad_token  # as rlhf_lib.lm.models.ensure_pad_token: pad != eos
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)

    def load(cls, **kw):
        model = cls.from_pretrained(args.model_dir, dtype=torch.float32, **kw)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    torch.manual_seed(args.seed)
    policy = load(AutoModelForCausalLM)
    ref_policy = load(AutoModelForCausalLM)
    reward_model = load(AutoModelForSequenceClassification, num_labels=1)
    value_model = load(AutoModelForSequenceClassification, num_labels=1)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id

    n_updates = args.warmup + args.updates
    dataset = Dataset.from_dict({"input_ids": prompts})
    with tempfile.TemporaryDirectory(prefix="trl112-bench-") as out_dir:
        config = PPOConfig(
            output_dir=out_dir,
            use_cpu=args.device == "cpu",
            bf16=False,
            fp16=False,  # fp32: TRL's bf16 default is True
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            total_episodes=args.batch_size * n_updates,
            response_length=args.response_length,
            num_ppo_epochs=args.num_ppo_epochs,
            num_mini_batches=args.num_mini_batches,
            temperature=args.temperature,
            learning_rate=args.learning_rate,
            stop_token="eos",
            kl_coef=0.05,
            num_sample_generations=0,
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            seed=args.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=dataset,
            eval_dataset=dataset,
            callbacks=[Clock()],
        )
        trainer.train()

    starts = [marks["train_begin"][0], *marks["step_end"][:-1]]
    rows = []
    for i, (start, end) in enumerate(zip(starts, marks["step_end"])):
        gen_t0, gen_t1, tokens = marks["gen"][i]
        rollout_end = max(t for t in marks["whiten"] if start <= t <= end)
        rows.append(
            {
                "update": i + 1,
                "time/update": end - start,
                "time/generation": gen_t1 - gen_t0,
                "time/forward": rollout_end - gen_t1,
                "time/optimization": end - rollout_end,
                "tokens": tokens,
            }
        )
    timed = rows[args.warmup :]
    seconds = sum(r["time/update"] for r in timed)
    gen_seconds = sum(r["time/generation"] for r in timed)
    result = {
        "name": "trl-1.12-full-fp32",
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "use_lora": False,
        "dtype": "float32",
        "warmup_updates": args.warmup,
        "timed_updates": len(timed),
        "episodes_per_s": args.batch_size * len(timed) / seconds if seconds > 0 else None,
        "s_per_update": seconds / len(timed) if timed else None,
        "generation_s": gen_seconds / len(timed) if timed else None,
        "forward_s": sum(r["time/forward"] for r in timed) / len(timed) if timed else None,
        "optimization_s": sum(r["time/optimization"] for r in timed) / len(timed) if timed else None,
        "tokens_per_s": sum(r["tokens"] for r in timed) / gen_seconds if gen_seconds > 0 else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "updates": rows,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
