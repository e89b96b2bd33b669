"""A/B of the shared prompt prefix (rlhf_lib.lm.prefix) on the bench's batch: the padded batch vs the packed row.

Builds the bench's reference trainer (the default profile's PPO), a batch of the bench's first 8 prompts with
48 random response tokens, and alternates the two paths in one process (so a shared machine's slow spells fall on
both): policy + value forward with grad, their backward, and the no-grad reference + reward forwards. Prints the
agreement of the two paths first (bf16: rounding-level), then the median seconds of each piece::

    OMP_WAIT_POLICY=ACTIVE .venv/bin/python scripts/ab_prefix.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlhf_lib.bench import configs as bench_configs
from rlhf_lib.bench import workers as bench_workers
from rlhf_lib.lm import models, prefix
from rlhf_lib.ppo import trainer as ppo

RESPONSE_LENGTH = 48
REPEATS = 8


def main() -> None:
    spec = bench_configs.BenchSpec()
    with tempfile.TemporaryDirectory(prefix="ab-prefix-") as scratch:
        trainer = bench_workers.make_ppo_trainer(bench_configs.REFERENCE_CONFIG, spec, Path(scratch))
        measure(trainer, spec)


def measure(trainer: ppo.PPOTrainer, spec: bench_configs.BenchSpec) -> None:
    queries, query_mask = ppo.left_pad(
        bench_configs.bench_prompts(trainer.tokenizer)[: spec.batch_size],
        trainer.tokenizer.pad_token_id,
        trainer.device,
    )
    gen = torch.Generator().manual_seed(0)
    responses = torch.randint(0, 40000, (queries.shape[0], RESPONSE_LENGTH), generator=gen)
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
        RESPONSE_LENGTH,
    )

    find = prefix.find_shared_prefix

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
        f"mean |log-prob difference| shared vs padded: {(shared[0] - padded[0]).abs().mean():.4f} nats/token; "
        f"policy - reference at init: {(shared[0] - shared[1]).abs().max():.2g} (shared), "
        f"{(padded[0] - padded[1]).abs().max():.2g} (padded); reward max |difference| "
        f"{(shared[2] - padded[2]).abs().max():.4f}"
    )
    times: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for _ in range(REPEATS):
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
