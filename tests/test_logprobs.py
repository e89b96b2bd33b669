"""The fused log-prob / entropy op (rlhf_lib.lm.logprobs): the same values and gradients as lm.sequences."""

from __future__ import annotations

import pytest
import torch

from rlhf_lib.lm import logprobs, sequences


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logprobs_match_plain_values_and_gradients(dtype, fused):
    torch.manual_seed(0)
    full = (torch.randn(3, 8, 50) * 3).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)
    logits = full[:, :-1]  # a strided view
    lp, ent = logprobs.token_logprobs_and_entropy(logits, tokens, temperature=0.7, chunk=3, fused=fused)
    (lp * weights).sum().backward()
    grad_fused, full.grad = full.grad.clone(), None
    lp_ref = sequences.logprobs_from_logits(logits, tokens, 0.7)
    (lp_ref * weights).sum().backward()
    torch.testing.assert_close(
        lp, lp_ref, rtol=1e-6, atol=1e-6
    )  # fp32 rounding: the compiled kernel sums in another order
    torch.testing.assert_close(ent, sequences.entropy_from_logits(logits, 0.7), rtol=0, atol=1e-4)
    torch.testing.assert_close(grad_fused.float(), full.grad.float(), rtol=0, atol=1e-6)
    assert not ent.requires_grad


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logprobs.token_logprobs_and_entropy(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), 0.0)
