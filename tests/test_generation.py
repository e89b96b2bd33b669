"""PPO's own decode loop: the sampling distribution, and teacher forcing as the reference for the cache handling."""

from __future__ import annotations

import pytest
import torch

from rlhf_lib.lm import generation, models, policy_models
from rlhf_lib.ppo import rollout


def test_sample_from_logits_matches_softmax_with_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.5, -1.0, float("-inf"), 1.0])
    n = 200_000
    tokens = generation.sample_from_logits(logits.expand(n, -1), temperature=0.7)  # (n,)
    assert tokens.shape == (n,) and tokens.dtype == torch.long
    freq = torch.bincount(tokens, minlength=5).double() / n
    expected = torch.softmax(logits.double() / 0.7, dim=-1)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert freq[3] == 0, "a token of probability 0 must never be drawn"
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (freq, expected)
    # temperature matters: at T = 0.7 the top token is clearly more likely than at T = 1
    assert freq[0] > torch.softmax(logits.double(), -1)[0] + 0.05


def test_sample_from_logits_rejects_greedy_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generation.sample_from_logits(torch.zeros(2, 3), temperature=0.0)


def _recording(monkeypatch, script=None):
    """Record the logits each step samples from; `script` (step -> tokens) overrides the draw."""
    seen: list[torch.Tensor] = []
    real = generation.sample_from_logits

    def fake(logits, temperature, generator=None):
        seen.append(logits.detach().float().clone())
        tokens = real(logits, temperature, generator)
        return script(len(seen) - 1, tokens) if script else tokens

    monkeypatch.setattr(generation, "sample_from_logits", fake)
    return seen


def _queries(tokenizer):
    prompts = [[5, 17, 33, 2, 9, 41], [7, 8], [12, 13, 14, 15]]  # different lengths: left padding in play
    return rollout.left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))


def _teacher_forced_logits(model, queries, query_mask, responses):
    """Full-sequence forward of query + response: logits predicting each response token (B, N, V)."""
    ids = torch.cat([queries, responses], dim=1)
    mask = torch.cat([query_mask, torch.ones_like(responses)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=models.position_ids_from_mask(mask)).logits
    return logits[:, queries.shape[1] - 1 : -1].float()


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
def test_decode_loop_samples_from_the_teacher_forced_distribution(ref, monkeypatch):
    """Each step's logits equal a full forward's over the same tokens: KV cache, positions and left padding right."""
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(ref)
    model = models.load_causal_lm(ref, tokenizer).eval()
    queries, query_mask = _queries(tokenizer)
    seen = _recording(monkeypatch)
    sampler = generation.ResponseSampler(
        model, max_new_tokens=6, temperature=1.0, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id
    )
    responses, steps = sampler(queries, query_mask)
    assert responses.shape == (3, 6) and steps == 6 and len(seen) == 6
    expected = _teacher_forced_logits(model, queries, query_mask, responses)
    torch.testing.assert_close(torch.stack(seen, 1), expected, atol=1e-4, rtol=1e-4)


def test_decode_loop_pads_after_eos_and_stops_when_every_row_has(monkeypatch):
    tokenizer = models.load_tokenizer("tiny:llama")
    model = models.load_causal_lm("tiny:llama", tokenizer).eval()
    queries, query_mask = _queries(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def script(step, tokens):  # row 0 stops at step 1, the others at step 3
        tokens = torch.full_like(tokens, 40 + step)
        if step >= 1:
            tokens[0] = eos
        if step == 3:
            tokens[:] = eos
        return tokens

    _recording(monkeypatch, script)
    responses, steps = generation.ResponseSampler(model, 10, 1.0, eos, pad)(queries, query_mask)
    assert steps == 4, "the loop stops once every row has emitted EOS"
    assert responses[0].tolist() == [40, eos] + [pad] * 8  # a stopped row gets pad, even where the draw was EOS
    assert responses[1].tolist() == [40, 41, 42, eos] + [pad] * 6


def test_decode_loop_validates_settings():
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation.ResponseSampler(torch.nn.Linear(1, 1), 0, 1.0, 1, 0)
    with pytest.raises(ValueError, match="temperature"):
        generation.ResponseSampler(torch.nn.Linear(1, 1), 4, 0.0, 1, 0)


@pytest.mark.slow
def test_compiled_decode_over_static_cache_matches_teacher_forcing_under_bf16_autocast(monkeypatch):
    """The compiled step with a bf16 static cache (LoRA policy, autocast as in PPO) samples from the same logits."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer("tiny:llama")
    model = get_peft_model(
        models.load_causal_lm("tiny:llama", tokenizer),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    policy_models.store_frozen_weights_in(model, torch.bfloat16)
    queries, query_mask = _queries(tokenizer)
    seen = _recording(monkeypatch)
    sampler = generation.ResponseSampler(
        model, 5, 1.0, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id, compile=True, cache_dtype=torch.bfloat16
    )
    from transformers import AttentionInterface

    # the compiled step's attention is decode_attention: a tensor counter (a Python list would be guarded on and
    # recompile) counts its one-query-token calls inside the graph, every step
    calls = torch.zeros((), dtype=torch.int64)

    def spy(module, query, *args, **kwargs):
        calls.add_(1 if query.shape[2] == 1 else 1000)
        return generation.decode_attention(module, query, *args, **kwargs)

    AttentionInterface.register(generation.DECODE_ATTENTION, spy)
    try:
        with torch.autocast("cpu", torch.bfloat16):
            for width in (0, 3):  # a wider prompt batch reuses the graph (symbolic cache length)
                seen.clear()
                queries, query_mask = (
                    torch.nn.functional.pad(t, (width, 0), value=v)
                    for t, v in ((queries, tokenizer.pad_token_id), (query_mask, 0))
                )
                responses, steps = sampler(queries, query_mask)
            expected = _teacher_forced_logits(model, queries, query_mask, responses)
    finally:
        AttentionInterface.register(generation.DECODE_ATTENTION, generation.decode_attention)
    assert steps == 5
    assert calls.item() == 2 * (steps - 1) * model.config.num_hidden_layers  # 2 calls x 4 compiled steps x layers
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # bf16: the decode step and the full forward round differently; the logits agree to bf16 precision
    torch.testing.assert_close(torch.stack(seen, 1), expected, atol=0.05, rtol=0.02)


def test_lora_factors_as_reductions_compute_the_same_and_restore_the_modules():
    """The decode-time LoRA rewrite gives the adapter's output (fp32 and bf16 autocast) and undoes itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tokenizer = models.load_tokenizer("tiny:llama")
    model = get_peft_model(
        models.load_causal_lm("tiny:llama", tokenizer),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    queries, query_mask = _queries(tokenizer)
    positions = models.position_ids_from_mask(query_mask)
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            expected = model(input_ids=queries, attention_mask=query_mask, position_ids=positions).logits
            with model.disable_adapter():
                base = model(input_ids=queries, attention_mask=query_mask, position_ids=positions).logits
            with generation.lora_factors_as_reductions(model) as patched:
                got = model(input_ids=queries, attention_mask=query_mask, position_ids=positions).logits
        assert patched == 2 * 2 * model.config.num_hidden_layers  # A and B of q_proj and v_proj in every layer
        tol = dict(atol=0.05, rtol=0.02) if autocast else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, expected, **tol)
        assert (expected - base).abs().max() > 10 * tol["atol"]  # the adapter matters, so the check has teeth
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa_with_grouped_heads_and_masks(dtype):
    """The fused one-token attention gives SDPA's output: grouped-query heads, boolean and additive masks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    B, H, Hkv, L, D = 3, 6, 2, 7, 8
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = H // Hkv, True
    query, key, value = (torch.randn(B, h, n, D).to(dtype) for h, n in ((H, 1), (Hkv, L), (Hkv, L)))
    allowed = torch.ones(B, 1, 1, L, dtype=torch.bool)
    allowed[0, ..., :3] = False  # left padding of row 0
    allowed[2, ..., -2:] = False  # static-cache slots not written yet
    additive = torch.zeros(B, 1, 1, L, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for mask in (allowed, additive, None):
        want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
        got, _ = generation.decode_attention(module, query, key, value, mask, scaling=0.3)
        assert got.shape == (B, 1, H, D) and got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
    # masked slots really are ignored: changing them changes nothing
    noisy = value.clone()
    noisy[0, :, :3] = 100.0
    torch.testing.assert_close(
        generation.decode_attention(module, query, key, noisy, allowed, scaling=0.3)[0],
        generation.decode_attention(module, query, key, value, allowed, scaling=0.3)[0],
    )
    # several query tokens (prefill) go to SDPA itself
    queries = torch.randn(B, H, 4, D).to(dtype)
    causal = torch.ones(B, 1, 4, L, dtype=torch.bool).tril(L - 4)
    torch.testing.assert_close(
        generation.decode_attention(module, queries, key, value, causal, scaling=0.3)[0],
        sdpa_attention_forward(module, queries, key, value, causal, scaling=0.3)[0],
    )
