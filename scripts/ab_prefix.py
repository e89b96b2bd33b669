"""A/B of the shared prompt prefix (rlhf_lib.lm.prefix) on the bench's batch: the padded batch vs the packed row.

Builds the bench's reference trainer (the default profile's PPO; ``--config`` another bench configuration,
``--model`` another model), a batch of the bench's first 8 prompts with 48 random response tokens
(``--response-length``), and alternates the two paths in one process (so a shared machine's slow spells fall on
both): policy + value forward with grad, their backward, and the no-grad reference + reward forwards. Prints the
shared prefix and the packed row's length, the agreement of the two paths (bf16: rounding-level), then the median
seconds of each piece::

    OMP_WAIT_POLICY=ACTIVE .venv/bin/python scripts/ab_prefix.py [--model M --config C --repeats N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from rlhf_lib.bench import configs as bench_configs
from rlhf_lib.bench import workers as bench_workers
from rlhf_lib.lm import models, prefix
from rlhf_lib.ppo import trainer as ppo

REPEATS = 8


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default = bench_configs.BenchSpec()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default.model, help=f"policy and reward model (default {default.model})")
    parser.add_argument(
        "--config",
        default=bench_configs.REFERENCE_CONFIG,
        choices=sorted(bench_configs.PPO_CONFIGS),
        help=f"bench PPO configuration (default {bench_configs.REFERENCE_CONFIG}, the default profile's)",
    )
    parser.add_argument("--response-length", type=int, default=default.response_length, help="random response tokens")
    parser.add_argument("--threads", type=int, default=default.threads, help="torch threads")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed rounds of both paths (after 2 warm-ups)")
    args = parser.parse_args(argv)
    if min(args.response_length, args.threads, args.repeats) < 1:
        parser.error("--response-length, --threads and --repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    spec = dataclasses.replace(
        bench_configs.BenchSpec(), model=args.model, response_length=args.response_length, threads=args.threads
    )
    with tempfile.TemporaryDirectory(prefix="ab-prefix-") as scratch:
        trainer = bench_workers.make_ppo_trainer(args.config, spec, Path(scratch))
        measure(trainer, spec, args.repeats)


def measure(trainer: ppo.PPOTrainer, spec: bench_configs.BenchSpec, repeats: int = REPEATS) -> None:
    queries, query_mask = ppo.left_pad(
        bench_configs.bench_prompts(trainer.tokenizer)[: spec.batch_size],
        trainer.tokenizer.pad_token_id,
        trainer.device,
    )
    gen = torch.Generator().manual_seed(0)
    responses = torch.randint(0, 40000, (queries.shape[0], spec.response_length), generator=gen)
    response_mask = torch.ones_like(responses, dtype=torch.bool)
    mask = torch.cat([query_mask, response_mask.long()], 1)
    roll = ppo.Rollout(
        queries,
        responses,
        response_mask,
        torch.zeros(len(queries), dtype=torch.bool),
        torch.cat([queries, responses], 1),
        mask,
        models.position_ids_from_mask(mask),
        spec.response_length,
    )

    find = prefix.find_shared_prefix
    shared_prefix = find(roll.query_responses, roll.attention_mask, roll.position_ids, roll.context_length)
    print(
        f"shared prefix: {shared_prefix.prefix_length if shared_prefix else 0} tokens; packed row "
        f"{shared_prefix.input_ids.shape[1] if shared_prefix else 'none'} instead of "
        f"{roll.query_responses.numel()} padded tokens per forward"
    )

    def run(share: bool):
        # the padded batch: every forward finds no shared prefix (the reward model is the value model's base)
        prefix.find_shared_prefix = find if share else (lambda *args, **kwargs: None)
        t0 = time.perf_counter()
        logprobs, values, _ = trainer._train_forward(roll, slice(None))
        t1 = time.perf_counter()
        (logprobs.sum() + values.sum()).backward()
        t2 = time.perf_counter()
        ref_logprobs, scores = trainer._ref_logprobs(roll), trainer._scores(roll)
        t3 = time.perf_counter()
        trainer.optimizer.zero_grad(set_to_none=True)
        return (t1 - t0, t2 - t1, t3 - t2), (logprobs.detach(), ref_logprobs, scores)

    for share in (False, True):  # compile both paths, warm them
        for _ in range(2):
            run(share)
    (_, padded), (_, shared) = run(False), run(True)
    print(
        f"mean |log-prob difference| shared vs padded: {(shared[0] - padded[0]).abs().mean():.2e} nats/token; "
        f"policy - reference at init: {(shared[0] - shared[1]).abs().max():.2g} (shared), "
        f"{(padded[0] - padded[1]).abs().max():.2g} (padded); reward max |difference| "
        f"{(shared[2] - padded[2]).abs().max():.2e}"
    )
    times: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for _ in range(repeats):
        for share in (False, True):
            times[share].append(run(share)[0])
    for share, ts in times.items():
        fwd, bwd, ref = (statistics.median(t[i] for t in ts) for i in range(3))
        print(
            f"{'shared prefix' if share else 'padded batch':14s} policy+value forward {fwd:.3f} s  backward "
            f"{bwd:.3f} s  reference+reward forwards {ref:.3f} s"
        )


if __name__ == "__main__":
    main()
