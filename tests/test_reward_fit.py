"""The reward model's training loop against plain paths: packed pairs against separate sequences, the cached trunk
against the whole forward, one step's loss and gradients against TRL's RewardTrainer, and the batch plan."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from rlhf_lib.lm import models
from rlhf_lib.reward import fit, packing, trunk
from rlhf_lib.reward.scoring import score_head, score_sequences
from rlhf_lib.reward.train import RewardModelConfig, build_reward_model, pairs_dataset, reward_optimizer, reward_trainer


def random_rows(n: int, seed: int, low: int = 100, high: int = 1000) -> list[dict]:
    rng = random.Random(seed)

    def ids(a, b):
        return [rng.randrange(low, high) for _ in range(rng.randint(a, b))]

    return [
        {"id": str(i), "prompt_ids": ids(2, 9), "chosen_ids": ids(1, 8), "rejected_ids": ids(1, 8)} for i in range(n)
    ]


def naive_mask(row: dict, width: int) -> torch.Tensor:
    """The visibility rule written out token by token: causal, and a response sees the prompt and itself only."""
    segments = [0] * len(row["prompt_ids"]) + [1] * len(row["chosen_ids"]) + [2] * len(row["rejected_ids"])
    segments += [-1] * (width - len(segments))
    mask = torch.zeros(width, width, dtype=torch.bool)
    for q in range(width):
        for k in range(q + 1):
            sq, sk = segments[q], segments[k]
            mask[q, k] = sq != -1 and sk != -1 and (sk == 0 or sk == sq)
        if segments[q] == -1:
            mask[q, 0] = True
    return mask


def test_pack_pairs_matches_the_rule_written_as_a_loop():
    rows = random_rows(6, seed=0)
    batch = packing.pack_pairs(rows, pad_id=0, margins=[0.5] * 6)
    width = batch.input_ids.shape[1]
    assert width == max(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    for i, row in enumerate(rows):
        p, c, r = len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])
        assert torch.equal(batch.attention_mask[i, 0], naive_mask(row, width))
        expected_ids = row["prompt_ids"] + row["chosen_ids"] + row["rejected_ids"] + [0] * (width - p - c - r)
        assert batch.input_ids[i].tolist() == expected_ids
        expected_pos = list(range(p + c)) + list(range(p, p + r)) + [0] * (width - p - c - r)
        assert batch.position_ids[i].tolist() == expected_pos
        assert int(batch.chosen_last[i]) == p + c - 1 and int(batch.rejected_last[i]) == p + c + r - 1
    assert batch.margin.tolist() == [0.5] * 6


def random_head(model, seed: int = 0):
    torch.manual_seed(seed)
    torch.nn.init.normal_(score_head(model).weight, std=0.5)
    return model.eval()


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
def test_packed_rewards_equal_each_sequence_scored_alone(ref):
    tok = models.load_tokenizer(ref)
    model = random_head(models.load_sequence_classifier(ref, tok))
    rows = random_rows(5, seed=1)
    with torch.no_grad():
        chosen, rejected = trunk.pair_rewards(model, packing.pack_pairs(rows, tok.pad_token_id))
    for i, row in enumerate(rows):
        for key, got in (("chosen_ids", chosen[i]), ("rejected_ids", rejected[i])):
            ids = torch.tensor([row["prompt_ids"] + row[key]])
            torch.testing.assert_close(got, score_sequences(model, ids, torch.ones_like(ids))[0], atol=1e-5, rtol=0)
    assert chosen.std() > 1e-3  # the rewards differ between pairs: the comparison above says something


def test_cached_trunk_gives_the_whole_forward():
    tok = models.load_tokenizer("tiny:llama")
    model = random_head(models.load_sequence_classifier("tiny:llama", tok))
    rows = random_rows(7, seed=2)
    assert trunk.can_split(model) and not trunk.can_split(models.load_sequence_classifier("tiny:gpt2", tok))
    cache = trunk.TrunkCache(model, rows, tok.pad_token_id, 1, torch.device("cpu"), torch.float32, batch_size=3)
    idx = [6, 0, 3]  # another grouping than the cache was built with
    hidden, batch = cache.batch(idx)
    with torch.no_grad():
        want = trunk.pair_rewards(model, packing.pack_pairs([rows[i] for i in idx], tok.pad_token_id))
        got = trunk.top_rewards(model, hidden, batch, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top", [0, 1])
def test_one_step_equals_reward_trainer(tmp_path, top):
    """Loss and every trainable gradient of one batch equal TRL RewardTrainer's on the same model and pairs."""
    tok = models.load_tokenizer("tiny:llama")
    cfg = RewardModelConfig(model="tiny:llama", trainable_top_layers=top, zero_init_head=False, lora_r=4)
    cfg.center_rewards_coefficient = 0.01
    torch.manual_seed(0)
    ours = build_reward_model(cfg, tok, torch.device("cpu"))
    theirs = copy.deepcopy(ours)
    rows = random_rows(4, seed=3)

    trl = reward_trainer(cfg, theirs, tok, torch.device("cpu"), torch.float32, pairs_dataset(rows), str(tmp_path))
    inputs = trl.data_collator([trl.train_dataset[i] for i in range(len(rows))])
    theirs.train()
    trl.compute_loss(theirs, inputs).backward()

    ours.train()
    score = fit.PairScorer(
        ours, rows, tok.pad_token_id, fit.first_trained_block(ours, top), torch.device("cpu"), torch.float32
    )
    assert score.first_block == top  # top=1: the lower of the two blocks is cached
    chosen, rejected, _ = score(list(range(len(rows))))
    loss = fit.pair_loss(chosen, rejected, None, cfg.center_rewards_coefficient)
    loss.backward()

    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(theirs_grads) and len(ours_grads) > 2
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(float(g.abs().max()) > 1e-4 for g in ours_grads.values())


def test_step_plan_covers_every_pair_each_epoch_and_grouping_pads_less():
    rng = random.Random(0)
    lengths = [rng.randint(20, 200) for _ in range(96)]
    padded = {}
    for grouped in (False, True):
        cfg = RewardModelConfig(
            model="tiny:llama", per_device_train_batch_size=8, num_train_epochs=2.0, group_by_length=grouped
        )
        plan = fit.StepPlan.build(cfg, lengths)
        assert plan.total == 24 and plan.steps_per_epoch == 12
        for epoch in plan.epochs:
            assert sorted(i for step in epoch for mb in step for i in mb) == list(range(96))
        assert plan.epochs[0] != plan.epochs[1]  # a new order each epoch
        padded[grouped] = sum(len(mb) * max(lengths[i] for i in mb) for step in plan.steps() for mb in step)
    assert padded[True] < 0.8 * padded[False], padded


def test_step_plan_fractional_epochs_and_accumulation():
    cfg = RewardModelConfig(
        model="tiny:llama", per_device_train_batch_size=4, num_train_epochs=1.5, gradient_accumulation_steps=2
    )
    plan = fit.StepPlan.build(cfg, [10] * 40)  # 10 micro-batches, 5 optimiser steps per epoch
    steps = list(plan.steps())
    assert plan.steps_per_epoch == 5 and plan.total == 8 and len(steps) == 8
    assert all(len(step) == 2 for step in steps) and plan.epoch_at(8) == 1.6
    assert fit.warmup_steps(0.05, 8) == 1 and fit.warmup_steps(3, 8) == 3 and fit.warmup_steps(0.0, 8) == 0


def test_fit_drops_overlong_pairs_and_logs_trl_keys():
    tok = models.load_tokenizer("tiny:llama")
    rows = random_rows(20, seed=4)
    rows[0]["chosen_ids"] = list(range(100, 160))
    cfg = RewardModelConfig(
        model="tiny:llama",
        max_length=40,
        num_train_epochs=1.0,
        logging_steps=1,
        per_device_train_batch_size=4,
        eval_steps=2,
    )
    model = build_reward_model(cfg, tok, torch.device("cpu"))
    score, held = fit.training_scorers(
        cfg, model, rows, tok.pad_token_id, torch.device("cpu"), torch.float32, eval_rows=random_rows(6, seed=5)
    )
    result = fit.fit_reward_model(cfg, model, reward_optimizer(cfg, model), score, held)
    assert result.n_pairs == 19  # the 60-token response is over max_length
    train = [e for e in result.log_history if "loss" in e]
    assert len(train) == 5 and {"accuracy", "margin", "grad_norm", "learning_rate", "mean_reward"} <= set(train[0])
    assert [e["step"] for e in result.log_history if "eval_loss" in e] == [2, 4]
    assert result.log_history[-1]["step"] == 5 and "train_runtime" in result.log_history[-1]
