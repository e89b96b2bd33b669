"""Microbenchmark of the log-prob/entropy pass over the vocabulary: chunked eager vs the compiled (fused) kernels.

SmolLM2's vocabulary (49,152), batch 8 x 48 response tokens, bf16 logits as PPO's LM head gives them. "chunked,
sliced" keeps T + 1 positions and slices the last one off (so backward zero-fills a wider gradient); "chunked" is
the eager pass on exactly T positions (PPO without torch_compile), "fused" the compiled kernels (PPO with
torch_compile). Variants alternate, so a
shared machine's slow spells fall on all of them; prints the median milliseconds of forward and backward::

    OMP_WAIT_POLICY=ACTIVE .venv/bin/python scripts/ab_logprobs.py
"""

from __future__ import annotations

import statistics
import time

import torch

from rlhf_lib.lm import logprobs as lp_ops

B, T, V = 8, 48, 49152


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    full = (torch.randn(B, T + 1, V) * 3).bfloat16()
    tokens = torch.randint(0, V, (B, T))
    weights = torch.randn(B, T)

    def run(fused: bool, sliced: bool) -> tuple[float, float]:
        if sliced:  # a view of T + 1 positions: backward fills the whole (B, T + 1, V) gradient
            leaf = full.clone().requires_grad_(True)
            logits = leaf[:, :-1]
        else:
            leaf = logits = full[:, :T].contiguous().requires_grad_(True)
        t0 = time.perf_counter()
        logprobs, _ = lp_ops.token_logprobs_and_entropy(logits, tokens, 0.7, fused=fused)
        t1 = time.perf_counter()
        (logprobs * weights).sum().backward()
        return t1 - t0, time.perf_counter() - t1

    variants = {"chunked, sliced": (False, True), "chunked": (False, False), "fused": (True, False)}
    for args in variants.values():  # compile the fused kernels, warm every path
        for _ in range(2):
            run(*args)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(10):
        for name, args in variants.items():
            times[name].append(run(*args))
    for name, ts in times.items():
        fwd, bwd = statistics.median(t[0] for t in ts) * 1e3, statistics.median(t[1] for t in ts) * 1e3
        print(f"{name:16s} forward {fwd:6.1f} ms  backward {bwd:6.1f} ms  total {fwd + bwd:6.1f} ms")


if __name__ == "__main__":
    main()
