"""A/B of the compiled decode step's options, interleaved in one process (a shared machine's slow spells fall on both).

Builds PPO exactly as ``python -m rlhf_lib.bench`` does for ``ours-lora-bf16-compile-all`` (SmolLM2-135M + LoRA, bf16,
batch 8, 48 tokens), compiles both variants, then alternates them and prints milliseconds per decoded token step::

    OMP_WAIT_POLICY=ACTIVE .venv/bin/python scripts/ab_decode.py --option lora_reductions --calls 16
    OMP_WAIT_POLICY=ACTIVE .venv/bin/python scripts/ab_decode.py --option skip_guards
    OMP_WAIT_POLICY=ACTIVE .venv/bin/python scripts/ab_decode.py --option fused_attention
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rlhf_lib import bench, ppo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--option", choices=("lora_reductions", "skip_guards", "fused_attention"), default="lora_reductions")
    p.add_argument("--calls", type=int, default=16, help="timed sampler calls, alternating off / on")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    spec = bench.BenchSpec(threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="rlhf-ab-") as scratch:
        trainer = bench.make_ppo_trainer("ours-lora-bf16-compile-all", spec, Path(scratch))
        measure(trainer, spec, args)


def measure(trainer, spec: bench.BenchSpec, args: argparse.Namespace) -> None:
    """Compile and warm both variants, then alternate them; prints ms per decode step for each."""
    tokenizer = trainer.tokenizer
    prompts = bench.bench_prompts(tokenizer)

    def sample(i: int, on: bool) -> float:
        setattr(trainer.sampler, args.option, on)
        rows = prompts[i % 4: i % 4 + spec.batch_size]
        ids, mask = ppo.left_pad(rows, tokenizer.pad_token_id, trainer.device)
        start = time.perf_counter()
        _, steps = trainer._generate(ids, mask)
        return (time.perf_counter() - start) / steps * 1e3

    t0 = time.perf_counter()
    for i in range(4):  # compile both variants, warm both
        sample(i, bool(i % 2))
    print(f"compiling and warm-up: {time.perf_counter() - t0:.0f} s")
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.calls):
        on = bool(i % 2)
        times[on].append(sample(i, on))
    for on, ms in times.items():
        print(f"{args.option}={on}: median {statistics.median(ms):.1f} ms/step, min {min(ms):.1f} "
              f"({', '.join(f'{m:.1f}' for m in ms)})")


if __name__ == "__main__":
    main()
