"""Microbenchmark of the log-prob/entropy pass over the vocabulary: chunked eager vs the compiled (fused) kernels.

By default SmolLM2's vocabulary (49,152), batch 8 x 48 response tokens, bf16 logits as PPO's LM head gives them.
"chunked, sliced" keeps T + 1 positions and slices the last one off (so backward zero-fills a wider gradient);
"chunked" is the eager pass on exactly T positions (PPO without torch_compile), "fused" the compiled kernels (PPO
with torch_compile). Prints first the agreement of each variant with "chunked" (the largest log-prob, entropy and
gradient difference: fp32 rounding), then the median milliseconds of forward and backward; the variants alternate,
so a shared machine's slow spells fall on all of them::

    OMP_WAIT_POLICY=ACTIVE .venv/bin/python scripts/ab_logprobs.py [--batch 8 --tokens 48 --vocab 49152]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

import torch

from rlhf_lib.lm import logprobs as lp_ops

VARIANTS = {"chunked, sliced": (False, True), "chunked": (False, False), "fused": (True, False)}  # (fused, sliced)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="rows (B)")
    parser.add_argument("--tokens", type=int, default=48, help="response tokens per row (T)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (V)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds of every variant (after 2 warm-ups)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    if min(args.batch, args.tokens, args.vocab, args.repeats, args.threads) < 1:
        parser.error("every size, --repeats and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    B, T, V = args.batch, args.tokens, args.vocab
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = (torch.randn(B, T + 1, V) * 3).bfloat16()
    tokens = torch.randint(0, V, (B, T))
    weights = torch.randn(B, T)

    def run(fused: bool, sliced: bool) -> tuple[tuple[float, float], tuple[torch.Tensor, ...]]:
        """(forward s, backward s), (log-probs, entropy, gradient on the T positions) of one variant."""
        if sliced:  # a view of T + 1 positions: backward fills the whole (B, T + 1, V) gradient
            leaf = full.clone().requires_grad_(True)
            logits = leaf[:, :-1]
        else:
            leaf = logits = full[:, :T].contiguous().requires_grad_(True)
        t0 = time.perf_counter()
        logprobs, entropy = lp_ops.token_logprobs_and_entropy(logits, tokens, 0.7, fused=fused)
        t1 = time.perf_counter()
        (logprobs * weights).sum().backward()
        seconds = (t1 - t0, time.perf_counter() - t1)
        return seconds, (logprobs.detach(), entropy, leaf.grad[:, :T].float())

    for variant in VARIANTS.values():  # compile the fused kernels, warm every path
        for _ in range(2):
            run(*variant)
    results = {name: run(*variant)[1] for name, variant in VARIANTS.items()}
    for name, got in results.items():
        if name != "chunked":
            diff = [float((a - b).abs().max()) for a, b in zip(got, results["chunked"])]
            print(
                f"{name} vs chunked: max |difference| log-prob {diff[0]:.2e}, entropy {diff[1]:.2e}, "
                f"gradient {diff[2]:.2e}"
            )
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, variant in VARIANTS.items():
            times[name].append(run(*variant)[0])
    for name, ts in times.items():
        fwd, bwd = statistics.median(t[0] for t in ts) * 1e3, statistics.median(t[1] for t in ts) * 1e3
        print(f"{name:16s} forward {fwd:6.1f} ms  backward {bwd:6.1f} ms  total {fwd + bwd:6.1f} ms")


if __name__ == "__main__":
    main()
