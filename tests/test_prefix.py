"""Shared prompt prefixes (rlhf_lib.lm.prefix, used by every PPO forward): the layout, and the same maths as padding."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_lib.lm import models, policy_models, prefix
from rlhf_lib.ppo import trainer as ppo
from rlhf_lib.ppo.metrics import read_jsonl

MODEL = "tiny:llama"
PAD = 0


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def used_layouts(monkeypatch):
    """Every layout the trainer's forwards build (so a test can tell the shared-prefix path really ran)."""
    found = []
    real = prefix.find_shared_prefix

    def spy(*args, **kwargs):
        layout = real(*args, **kwargs)
        if layout is not None:
            found.append(layout)
        return layout

    monkeypatch.setattr(prefix, "find_shared_prefix", spy)
    return found


def padded_batch(prompts: list[list[int]], responses: list[list[int]], width: int):
    """Left-padded prompts + right-padded responses of `width`: ids, mask, positions, context length."""
    queries, qmask = ppo.left_pad(prompts, PAD, torch.device("cpu"))
    resp = torch.full((len(responses), width), PAD)
    rmask = torch.zeros(len(responses), width, dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor(r)
        rmask[i, : len(r)] = 1
    mask = torch.cat([qmask, rmask], 1)
    return torch.cat([queries, resp], 1), mask, models.position_ids_from_mask(mask), queries.shape[1]


SHARED = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # 10 tokens every prompt starts with


def test_layout_packed_row_positions_and_masks():
    prompts = [SHARED + [30, 31], SHARED + [40], SHARED + [50, 51, 52]]
    ids, mask, pos, ctx = padded_batch(prompts, [[60, 61], [70], [80, 81]], width=2)  # ctx 13, L 15
    layout = prefix.find_shared_prefix(ids, mask, pos, ctx, min_length=4)
    assert layout is not None
    # the prefix stops where the prompts differ; suffixes start at the longest prompt's first suffix column
    assert layout.prefix_length == 10 and layout.offset == 10 and layout.suffix_length == 5
    assert layout.input_ids.shape == (1, 10 + 3 * 5)  # one packed row: P + B * S, no padding after the prefix
    assert layout.input_ids[0, :10].tolist() == SHARED
    assert layout.position_ids[0, :10].tolist() == list(range(10))
    # suffix 0 (prompt of 12 tokens, one column of left padding): a shifted prefix token, then its suffix
    assert layout.input_ids[0, 10:15].tolist() == [20, 30, 31, 60, 61]
    assert layout.position_ids[0, 11:14].tolist() == [10, 11, 12]
    assert layout.input_ids[0, 20:25].tolist() == [50, 51, 52, 80, 81]
    # its shifted prefix tokens are masked as keys: they are the prefix's, already
    bias = layout.attention_bias[:, 0]  # (B, S, P + S)
    assert bias.shape == (3, 5, 15)
    visible = bias == 0
    assert visible[:, :, :10].all()  # every suffix token sees the whole prefix
    assert visible[0, 4, 10:].tolist() == [False, True, True, True, True]
    assert visible[0, 1, 10:].tolist() == [False, True, False, False, False]  # causal
    assert visible[1, 4, 10:15].tolist() == [False, False, True, True, False]  # response padded after 1 token
    assert visible[2, 4, 10:15].tolist() == [True] * 5
    assert (layout.prefix_bias == 0).tolist() == torch.ones(10, 10, dtype=torch.bool).tril().tolist()
    # response columns 13, 14 of every sequence in the packed row, sequence-major
    assert layout.suffix_columns(torch.tensor([13, 14])).tolist() == [13, 14, 18, 19, 23, 24]
    # outputs come back in padded-batch columns
    packed = torch.arange(25, dtype=torch.float)[None]  # (1, P + B * S)
    back = layout.unpack(packed, ids.shape[1])
    assert back.shape == (3, 15) and back[:, :10].eq(0).all() and back[2, 10:].tolist() == list(range(20, 25))


@pytest.mark.parametrize(
    "prompts, why",
    [
        ([SHARED + [30]], "one row"),
        ([[1] + SHARED, [2] + SHARED], "first tokens differ"),
        ([SHARED[:5] + [30, 31, 32, 33, 34, 35], SHARED[:5] + [40, 41, 42, 43, 44, 45]], "prefix under min_length"),
    ],
)
def test_no_layout_when_it_would_not_pay(prompts, why):
    ids, mask, pos, ctx = padded_batch(prompts, [[60]] * len(prompts), width=1)
    assert prefix.find_shared_prefix(ids, mask, pos, ctx, min_length=8) is None, why


def test_the_prefix_leaves_every_prompt_a_token_to_predict_from():
    prompts = [SHARED, SHARED]  # identical prompts: the last prompt token must stay in the suffixes
    ids, mask, pos, ctx = padded_batch(prompts, [[60] * 6, [70] * 6], width=6)
    layout = prefix.find_shared_prefix(ids, mask, pos, ctx, min_length=4)
    assert (
        layout.prefix_length == 9 and layout.input_ids[0, 9].item() == layout.input_ids[0, 9 + 7].item() == SHARED[-1]
    )


def forwards_and_grads(policy, head, ids, mask, pos, ctx, share: bool):
    """Response log-prob logits and values through the trainer's code paths, and their parameter gradients."""
    policy.zero_grad()
    head.zero_grad()
    logits = policy_models.response_logits(policy, ids, mask, pos, ctx, share_prefix=share)  # (B, T, V)
    values = head(ids, mask, pos, ctx if share else None)[:, ctx - 1 : -1]  # (B, T); no context: the padded batch
    real = mask[:, ctx:].bool()
    loss = logits.float().logsumexp(-1)[real].sum() + values[real].sum()
    loss.backward()
    grads = {
        f"{what}.{n}": p.grad.clone()
        for what, m in (("policy", policy), ("value", head))
        for n, p in m.named_parameters()
        if p.grad is not None
    }
    return logits.detach()[real], values.detach()[real], grads


@pytest.mark.parametrize(
    "ref, compiled",
    [(MODEL, False), ("tiny:gpt2", False), pytest.param(MODEL, True, marks=pytest.mark.slow)],
    ids=["llama-eager", "gpt2-eager", "llama-compiled"],
)
def test_same_logits_values_and_gradients_as_the_padded_batch(ref, compiled, used_layouts):
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(ref)
    policy = models.load_causal_lm(ref, tokenizer)
    head = policy_models.ScalarHead(models.load_sequence_classifier(ref, tokenizer))
    for model in (policy, head.model):
        policy_models.use_eager_attention(model)
        if compiled:
            models.compile_blocks(model)
    prompts = [SHARED + [30, 31], SHARED + [40], SHARED + [50, 51, 52], SHARED + [33, 34]]
    responses = [[60, 61, 62], [70], [80, 81, 82], [90, 91]]  # rows 2 and 4 stop early (padding after)
    batch = padded_batch(prompts, responses, width=3)
    assert prefix.find_shared_prefix(*batch) is not None
    used_layouts.clear()
    want = forwards_and_grads(policy, head, *batch, share=False)
    assert not used_layouts
    got = forwards_and_grads(policy, head, *batch, share=True)
    assert len(used_layouts) == 2  # policy and value
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    assert got[2].keys() == want[2].keys() and len(want[2]) > 10
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, atol=1e-4, rtol=1e-3, msg=name)
    # the reward read at the last real token agrees too
    with torch.no_grad():
        plain = policy_models.scores_at_last_token(head, batch[0], batch[1])
        shared = policy_models.scores_at_last_token(head, batch[0], batch[1], batch[3])
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)


def test_the_lm_head_runs_on_the_response_positions_only(used_layouts):
    """Only the response positions' logits are read: the head computes those and nothing else (no prefix logits,
    no slice whose backward would zero-fill a wider gradient)."""
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(MODEL)
    policy = models.load_causal_lm(MODEL, tokenizer)
    policy_models.use_eager_attention(policy)
    batch = padded_batch([SHARED + [30, 31], SHARED + [40], SHARED + [50]], [[60] * 4, [70] * 2, [80] * 3], width=4)
    head_inputs = []
    handle = policy.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: head_inputs.append(tuple(args[0].shape[:-1]))
    )
    logits = policy_models.response_logits(policy, *batch)
    handle.remove()
    assert len(used_layouts) == 1 and head_inputs == [(1, 3 * 4)] and logits.shape[:2] == (3, 4)


def test_shared_prefix_through_distributed_data_parallel(tmp_path, used_layouts):
    """With several processes accelerate wraps the policy in DDP: the attention switch must reach the model inside."""
    import torch.distributed as dist

    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(MODEL)
    policy = models.load_causal_lm(MODEL, tokenizer)
    policy_models.use_eager_attention(policy)
    batch = padded_batch([SHARED + [30, 31], SHARED + [40]], [[60] * 8, [70] * 5], width=8)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(policy)
        shared = policy_models.response_logits(wrapped, *batch)
        padded = policy_models.response_logits(wrapped, *batch, share_prefix=False)
    finally:
        dist.destroy_process_group()
    assert len(used_layouts) == 1
    real = batch[1][:, batch[3] :].bool()
    torch.testing.assert_close(shared[real], padded[real], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_ppo_with_a_shared_prefix_trains_like_the_padded_batch(tmp_path, used_layouts, monkeypatch):
    """Three LoRA updates with the reward model as the value model's adapter-off base: the same metrics (fp32) as
    with every forward on the padded batch (no prefix found)."""
    tokenizer = models.load_tokenizer(MODEL)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Say something about {t}."}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for t in "apples pears cats dogs rain snow music books".split()
    ]
    rows = {}
    spy = prefix.find_shared_prefix
    for share in (False, True):
        used_layouts.clear()
        monkeypatch.setattr(prefix, "find_shared_prefix", spy if share else lambda *args, **kwargs: None)
        cfg = ppo.PPOConfig(
            model=MODEL,
            dtype="float32",
            device="cpu",
            use_lora=True,
            total_episodes=24,
            batch_size=8,
            response_length=8,
            temperature=0.7,
            learning_rate=3e-3,
            save_every=0,
            sample_every=0,
            seed=0,
            lora_target_modules=["all-linear"],
        )
        torch.manual_seed(0)
        built = policy_models.build_models(cfg, tokenizer, MODEL, None)
        assert built.reward_fn.head is built.value
        trainer = ppo.PPOTrainer(
            cfg,
            tokenizer,
            built.policy,
            built.ref_policy,
            built.value,
            built.reward_fn,
            copy.deepcopy(prompts),
            tmp_path / str(share) / "ppo",
            tmp_path / str(share) / "ck",
        )
        trainer.train()
        rows[share] = read_jsonl(tmp_path / str(share) / "ppo" / "metrics.jsonl")
        # per update: reference, reward, rollout policy + value, then 3 more epochs of policy + value
        assert len(used_layouts) == (3 * (2 + 2 + 3 * 2) if share else 0)
    assert min(layout.prefix_length for layout in used_layouts) >= 8  # the chat template + "Say something about"
    assert len(rows[True]) == len(rows[False]) == 3
    for a, b in zip(rows[False], rows[True]):
        for key in (
            "objective/scores",
            "objective/kl",
            "loss/policy_avg",
            "loss/value_avg",
            "policy/entropy_avg",
            "val/ratio",
            "objective/rlhf_reward",
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (a["update"], key)
