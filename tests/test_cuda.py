"""The GPU code paths against their eager references: CUDA-graph decoding, compiled blocks, autocast PPO steps and the
packed shared-prefix forward. Tests marked ``cuda`` skip cleanly without a CUDA device (``pytest -m cuda`` selects
them on a GPU machine: scripts/device_check.sh); the CPU cases run the same mechanism where it exists on CPU
(``reduce-overhead`` compiles without graphs there) and the cache/mask logic that needs no compiler at all."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_lib.lm import generation, models
from rlhf_lib.ppo import trainer as ppo

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
ON_CUDA = [cuda, needs_cuda]


def _queries(tokenizer, device, width: int = 0):
    prompts = [[5, 17, 33, 2, 9, 41], [7, 8], [12, 13, 14, 15]]  # different lengths: left padding in play
    queries, mask = ppo.left_pad(prompts, tokenizer.pad_token_id, torch.device(device))
    pad = torch.nn.functional.pad
    return pad(queries, (width, 0), value=tokenizer.pad_token_id), pad(mask, (width, 0), value=0)


def _recording(monkeypatch):
    """Every step's logits, as the sampler samples from them."""
    seen: list[torch.Tensor] = []
    real = generation.sample_from_logits

    def record(logits, temperature, generator=None):
        seen.append(logits.detach().float().clone())
        return real(logits, temperature, generator)

    monkeypatch.setattr(generation, "sample_from_logits", record)
    return seen


# ----------------------------------------------------------------------------------------------------------------
# DecodeStep's cache and mask handling (no compiling)


def test_decode_step_modes_and_auto_choice():
    with pytest.raises(ValueError, match="choose from"):
        generation.DecodeStep(torch.nn.Linear(1, 1), mode="max-autotune")
    tokenizer = models.load_tokenizer("tiny:llama")
    model = models.load_causal_lm("tiny:llama", tokenizer)
    step = generation.DecodeStep(model)  # auto
    assert step.resolve(torch.device("cpu")) == "default" and not step.graphs
    assert generation.DecodeStep(model).resolve(torch.device("cuda")) == "reduce-overhead"  # decided by the device
    sampler = generation.ResponseSampler(model, 4, 1.0, -1, tokenizer.pad_token_id, compile=True)
    assert sampler._step.requested == "auto"


def test_graph_mode_keeps_one_bucketed_cache_and_pads_the_mask():
    """CUDA graphs read fixed addresses: the cache is reused (zeroed) per (batch, bucketed length), the mask padded."""
    tokenizer = models.load_tokenizer("tiny:llama")
    model = models.load_causal_lm("tiny:llama", tokenizer)
    step = generation.DecodeStep(model, mode="reduce-overhead", bucket=16)
    queries, _ = _queries(tokenizer, "cpu")  # (3, 6)
    first = step.cache(model, queries, 6 + 5, None)
    assert first.get_max_length() == 16
    with torch.no_grad():  # fill it as a prefill would
        model(input_ids=queries, past_key_values=first, use_cache=True)
    assert first.get_seq_length() == 6 and first.layers[0].keys.abs().sum() > 0
    again = step.cache(model, torch.zeros(3, 9, dtype=torch.long), 9 + 5, None)  # 14 tokens: the same bucket
    assert again is first and again.get_seq_length() == 0 and again.layers[0].keys.abs().sum() == 0
    assert step.cache(model, queries, 6 + 20, None) is not first  # 26 tokens: the next bucket, its own cache
    assert step.cache(model, queries[:2], 11, None) is not first  # another batch size
    mask = torch.ones(3, 11, dtype=torch.long)
    padded = step._padded_mask(mask, 16)
    assert padded.shape == (3, 16) and padded[:, :11].eq(1).all() and padded[:, 11:].eq(0).all()
    assert step._padded_mask(mask, 16) is padded  # one pad per call, not per step
    # the default mode keeps nothing: a fresh cache of the exact length per call
    default = generation.DecodeStep(model, mode="default")
    assert default.cache(model, queries, 11, None).get_max_length() == 11
    assert default.cache(model, queries, 11, None) is not default.cache(model, queries, 11, None)


# ----------------------------------------------------------------------------------------------------------------
# decoding: the compiled step (CUDA graphs on a GPU) samples exactly what eager decoding samples


@pytest.mark.parametrize(
    "device, mode",
    [
        pytest.param("cpu", "reduce-overhead", marks=pytest.mark.slow),
        pytest.param("cuda", "reduce-overhead", marks=ON_CUDA),
        pytest.param("cuda", True, marks=ON_CUDA),  # compile=True: the device chooses CUDA graphs
    ],
    ids=["cpu-reduce-overhead", "cuda-graphs", "cuda-auto"],
)
def test_compiled_decode_samples_what_eager_decoding_samples(device, mode, monkeypatch):
    """Same seed, same tokens: fp32, two calls of different prompt widths (the second reuses the graph's cache)."""
    torch._dynamo.reset()
    tokenizer = models.load_tokenizer("tiny:llama")
    model = models.load_causal_lm("tiny:llama", tokenizer, device).eval()
    seen = _recording(monkeypatch)
    eager = generation.ResponseSampler(model, 6, 1.0, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
    compiled = generation.ResponseSampler(
        model, 6, 1.0, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id, compile=mode
    )
    for call, width in enumerate((0, 3)):
        queries, mask = _queries(tokenizer, device, width)
        results = {}
        for name, sampler in (("eager", eager), ("compiled", compiled)):
            seen.clear()
            torch.manual_seed(call)
            results[name] = sampler(queries, mask), torch.stack(seen, 1)
        (want, want_steps), want_logits = results["eager"]
        (got, got_steps), got_logits = results["compiled"]
        assert got_steps == want_steps == 6
        assert torch.equal(got, want), (call, got, want)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert compiled._step.mode == "reduce-overhead"
    assert len(compiled._step._caches) == 1  # widths 0 and 3 share one bucket: one cache, one recorded graph


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
@cuda
@needs_cuda
def test_cuda_graph_decode_under_bf16_autocast_matches_teacher_forcing(ref, monkeypatch):
    """PPO's setting on a GPU: bf16 autocast, bf16 static cache, CUDA graphs; the step's logits are a full forward's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(ref)
    model = models.load_causal_lm(ref, tokenizer, "cuda").eval()
    queries, mask = _queries(tokenizer, "cuda")
    seen = _recording(monkeypatch)
    sampler = generation.ResponseSampler(
        model, 5, 1.0, -1, tokenizer.pad_token_id, compile=True, cache_dtype=torch.bfloat16
    )
    with torch.autocast("cuda", torch.bfloat16):
        for _ in range(2):  # the second call replays the recorded graph
            seen.clear()
            responses, steps = sampler(queries, mask)
        ids = torch.cat([queries, responses], 1)
        full_mask = torch.cat([mask, torch.ones_like(responses)], 1)
        with torch.no_grad():
            logits = model(
                input_ids=ids, attention_mask=full_mask, position_ids=models.position_ids_from_mask(full_mask)
            ).logits
    expected = logits[:, queries.shape[1] - 1 : -1].float()
    assert steps == 5 and sampler._step.graphs
    torch.testing.assert_close(torch.stack(seen, 1), expected, atol=0.05, rtol=0.02)


# ----------------------------------------------------------------------------------------------------------------
# full-sequence forwards on CUDA


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
@cuda
@needs_cuda
def test_compiled_blocks_match_eager_on_cuda(ref):
    """models.compile_blocks on CUDA (dynamic shapes, Triton): same logits and gradients, one graph for two lengths."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(ref)
    model = models.load_causal_lm(ref, tokenizer, "cuda")
    ids = torch.randint(5, 200, (2, 11), device="cuda")

    def loss_and_grads(n_tokens: int):
        model.zero_grad()
        logits = model(input_ids=ids[:, :n_tokens], use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_logits, eager_grads = loss_and_grads(11)
    models.compile_blocks(model)
    short, _ = loss_and_grads(7)
    logits, grads = loss_and_grads(11)
    torch.testing.assert_close(short, eager_logits[:, :7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@cuda
@needs_cuda
def test_shared_prefix_forward_matches_the_padded_batch_on_cuda(compiled):
    """The packed shared-prefix row (rlhf_lib.lm.prefix) on CUDA, eager and with compiled blocks (the configuration
    whose training graph once failed in Inductor under symbolic sizes): same logits, values and gradients."""
    from test_prefix import SHARED, forwards_and_grads, padded_batch

    torch._dynamo.reset()
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer("tiny:llama")
    policy = models.load_causal_lm("tiny:llama", tokenizer, "cuda")
    head = ppo.ScalarHead(models.load_sequence_classifier("tiny:llama", tokenizer, "cuda"))
    if compiled:
        for model in (policy, head.model):
            models.compile_blocks(model)
    prompts = [SHARED + [30, 31], SHARED + [40], SHARED + [50, 51, 52], SHARED + [33, 34]]
    batch = padded_batch(prompts, [[60, 61, 62], [70], [80, 81, 82], [90, 91]], width=3)
    batch = (*(t.cuda() for t in batch[:3]), batch[3])
    want = forwards_and_grads(policy, head, *batch, share=False)
    got = forwards_and_grads(policy, head, *batch, share=True)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    assert got[2].keys() == want[2].keys() and len(want[2]) > 10
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, atol=1e-4, rtol=1e-3, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# a whole PPO update under autocast on CUDA


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@cuda
@needs_cuda
def test_autocast_ppo_update_on_cuda_is_finite_and_moves_the_policy(dtype, tmp_path):
    """One PPO update (full fine-tuning, compiled blocks and CUDA-graph decoding) under bf16 / fp16 autocast."""
    from rlhf_lib.core import runtime
    from rlhf_lib.ppo.metrics import read_jsonl

    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    assert runtime.pick_dtype(dtype, torch.device("cuda")) == getattr(torch, dtype)  # both are CUDA precisions
    torch._dynamo.reset()
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer("tiny:llama")
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Say something about {t}."}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for t in "apples pears cats dogs rain snow music books".split()
    ]
    cfg = ppo.PPOConfig(
        model="tiny:llama",
        dtype=dtype,
        device="cuda",
        use_lora=False,
        total_episodes=8,
        batch_size=8,
        response_length=8,
        learning_rate=1e-4,
        save_every=0,
        sample_every=0,
        torch_compile=True,
        compile_generation=True,
        share_prompt_prefix=True,
        seed=0,
    )
    policy = models.load_causal_lm(cfg.model, tokenizer)
    value = ppo.ScalarHead(models.load_sequence_classifier(cfg.model, tokenizer), cfg.share_prompt_prefix)
    target = prompts[0][-1]

    def reward(query_responses, attention_mask, context_length):
        response, mask = query_responses[:, context_length:], attention_mask[:, context_length:].bool()
        return ((response == target) & mask).float().sum(1)

    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = ppo.PPOTrainer(
        cfg,
        tokenizer,
        policy,
        copy.deepcopy(policy),
        value,
        reward,
        prompts,
        tmp_path / "ppo",
        tmp_path / "checkpoints",
    )
    trainer.train()
    assert trainer.sampler._step.graphs  # the GPU path: CUDA-graph decoding
    row = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")[-1]
    for key in ("loss/policy_avg", "loss/value_avg", "objective/kl", "objective/entropy"):
        assert key in row and row[key] == row[key] and abs(row[key]) < float("inf"), (key, row.get(key))
    moved = max(
        (p.detach().cpu() - before[n]).abs().max().item() for n, p in trainer._unwrapped_policy().named_parameters()
    )
    assert moved > 0, "the optimiser step changed no policy weight"
