"""Model resolution: bundled GGUF -> cached safetensors, tiny models, local folders; tokenizer fix-ups."""

from __future__ import annotations

import time

import pytest
import torch

from rlhf_lib.core.config import ConfigError
from rlhf_lib.lm import models

BUNDLED = "bundled:smollm2-135m-instruct"


def test_bundled_model_cached_and_answers_sensibly():
    models.resolve_model_ref(BUNDLED)  # converts on first use (~15 s), cached afterwards
    start = time.time()
    path = models.resolve_model_ref(BUNDLED)
    tokenizer = models.load_tokenizer(BUNDLED)
    model = models.load_causal_lm(BUNDLED, tokenizer)
    assert time.time() - start < 10, "second load must come from the safetensors cache"
    assert (models.cache_root() / "smollm2-135m-instruct" / "model.safetensors").exists()
    assert path.endswith("smollm2-135m-instruct")
    assert "quantization_config" not in model.config.to_dict()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_bundled_tokenizer_pad_differs_from_eos():
    tokenizer = models.load_tokenizer(BUNDLED)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_tiny_gpt2_gets_pad_token_and_simple_template():
    tokenizer = models.load_tokenizer("tiny:gpt2")
    assert tokenizer.pad_token == models.PAD_TOKEN_FALLBACK
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "User: Hi\n\nAssistant:"
    model = models.load_causal_lm("tiny:gpt2", tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)  # resized for the added pad token
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["a b c", "a"], return_tensors="pt", padding=True)
    assert batch["input_ids"][1, 0].item() == tokenizer.pad_token_id  # left padding


def test_tiny_llama_is_deterministic_and_dropout_free():
    tokenizer = models.load_tokenizer("tiny:llama")
    a = models.load_causal_lm("tiny:llama", tokenizer)
    b = models.load_causal_lm("tiny:llama", tokenizer)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert all(m.p == 0.0 for m in a.modules() if isinstance(m, torch.nn.Dropout))


def test_sequence_classifier_from_causal_checkpoint():
    tokenizer = models.load_tokenizer("tiny:llama")
    rm = models.load_sequence_classifier("tiny:llama", tokenizer)
    batch = tokenizer(["hello there", "hi"], return_tensors="pt", padding=True)
    assert rm(**batch).logits.shape == (2, 1)


def test_local_folder_and_errors(tmp_path):
    folder = models.resolve_model_ref("tiny:llama")
    assert models.resolve_model_ref(folder) == folder  # a local folder resolves to itself
    with pytest.raises(ValueError, match="unknown model reference"):
        models.resolve_model_ref("bundled:nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty has no config.json"):
        models.resolve_model_ref(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        models.resolve_model_ref(str(tmp_path / "missing"))
    assert models.resolve_model_ref("gpt2") == "gpt2"  # hub ids pass through for online users


def test_interrupted_build_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_LAB_CACHE", str(tmp_path))

    def boom(out):
        (out / "partial.bin").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.atomic_build(tmp_path / "m", boom)
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []


def test_compile_dynamic_sets_the_inductor_settings_our_compiles_need():
    """Every dynamic-shape compile raises Dynamo's recompile limit to >= 16 (never lowers it) and turns off Triton's
    coalesce tiling analysis (it asserts under symbolic sizes on CUDA, torch 2.11); the function still computes."""
    import torch._inductor.config as inductor_config

    # config.patch restores the settings afterwards (pytest's monkeypatch would delete them from the config module)
    with (
        torch._dynamo.config.patch(recompile_limit=8),
        inductor_config.patch({"triton.coalesce_tiling_analysis": True}),
    ):
        doubled = models.compile_dynamic(lambda x: 2 * x + 1)
        assert torch._dynamo.config.recompile_limit == 16
        assert inductor_config.triton.coalesce_tiling_analysis is False
        torch.testing.assert_close(doubled(torch.arange(4.0)), torch.tensor([1.0, 3.0, 5.0, 7.0]))
    with torch._dynamo.config.patch(recompile_limit=64):
        models.compile_dynamic(lambda x: x)
        assert torch._dynamo.config.recompile_limit == 64


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
def test_compile_blocks_same_outputs_and_grads_generation_stays_eager(ref):
    """torch.compile per block: same logits and gradients as eager, one graph for all blocks, decoding untouched."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tokenizer = models.load_tokenizer(ref)
    model = models.load_causal_lm(ref, tokenizer)
    ids = torch.randint(5, 200, (2, 11))

    def loss_and_grads(n_tokens: int):
        model.zero_grad()
        logits = model(input_ids=ids[:, :n_tokens], use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_logits, eager_grads = loss_and_grads(11)
    assert models.compile_blocks(model) == len(models.transformer_blocks(model)) >= 2
    for n_tokens in (11, 7):  # a new length must not need a new graph (dynamic shapes)
        logits, grads = loss_and_grads(n_tokens)
    torch.testing.assert_close(logits, eager_logits[:, :7], atol=1e-4, rtol=1e-4)  # causal: a prefix's logits
    logits, grads = loss_and_grads(11)
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # every block, both lengths: one graph
    with torch.no_grad():  # generation passes a KV cache: eager path, same tokens as the eager model
        out = model.generate(
            input_ids=ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    models.uncompile_blocks(model)
    assert all("forward" not in vars(b) for b in models.transformer_blocks(model))
    with torch.no_grad():
        again = model.generate(
            input_ids=ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert torch.equal(out, again)
    assert counters["stats"]["unique_graphs"] == 1, "generation must not have compiled anything"
