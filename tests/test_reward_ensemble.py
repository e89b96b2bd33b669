"""Reward-model ensembles: the combinations against loops, WARM's average of merged updates, member resets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rlhf_lib.lm import models
from rlhf_lib.reward import ensemble as ens
from rlhf_lib.reward.train import RewardModelConfig, build_reward_model


def test_combinations_equal_loops_over_members():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 9)) * [[1.0], [2.0], [0.5], [3.0]] + [[0.0], [1.0], [-2.0], [5.0]]
    mean, std = scores.mean(axis=1), scores.std(axis=1)
    z = ens.standardise(scores, mean, std)
    for j in range(9):
        col = [(scores[m, j] - mean[m]) / std[m] for m in range(4)]
        mu = sum(col) / 4
        var = sum((x - mu) ** 2 for x in col) / 4
        assert ens.combine(z, "mean")[j] == pytest.approx(mu)
        assert ens.combine(z, "min")[j] == pytest.approx(min(col))
        assert ens.combine(z, "uwo", 0.3)[j] == pytest.approx(mu - 0.3 * var)
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-12)  # each member on its own scale
    with pytest.raises(ValueError, match="mean, min|one of"):
        ens.combine(z, "median")


def trained_like(model, seed: int):
    """Give every adapter non-zero B (as training would) and the head a value, reproducibly."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in ens.lora_layers(model):
            for b in layer.lora_B.values():
                b.weight.normal_(std=0.5)
        ens.score_head(model).weight.normal_()
    return model


def test_warm_averages_the_merged_updates_not_the_factors():
    tok = models.load_tokenizer("tiny:llama")
    cfg = RewardModelConfig(model="tiny:llama", lora_r=2, trainable_top_layers=1)
    base = build_reward_model(cfg, tok, torch.device("cpu"))
    members, merged, factors = [], [], []
    for m in range(3):
        model = copy.deepcopy(base)
        ens.reset_member(model, seed=10 + m, zero_head=True)
        trained_like(model, seed=m)
        members.append(ens.member_weights(model))
        first = ens.lora_layers(model)[0]  # this member's factors of the first adapted layer
        factors.append((first.lora_A["default"].weight.clone(), first.lora_B["default"].weight.clone(), first.scaling))
        merged.append(copy.deepcopy(model).merge_and_unload().state_dict())  # peft's own merge of one member
    setter = ens.WeightSetter(copy.deepcopy(base))
    warm = setter.load(ens.average(members)).state_dict()
    expected = {k: torch.stack([sd[k] for sd in merged]).mean(dim=0) for k in merged[0]}
    assert set(warm) == set(expected)
    for key in expected:
        torch.testing.assert_close(warm[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
    # averaging A and B apart is another model: the point of merging first
    mean_a = torch.stack([a for a, _, _ in factors]).mean(0)
    mean_b = torch.stack([b for _, b, _ in factors]).mean(0)
    from_factors = (mean_b @ mean_a) * factors[0][2]["default"]
    warm_delta = ens.average(members).deltas[0]
    assert float(warm_delta.abs().max()) > 0
    assert not torch.allclose(from_factors, warm_delta, atol=1e-4)
    first_key = next(k for k in expected if "layers.1" in k and "proj" in k)
    torch.testing.assert_close(
        setter.load(members[1]).state_dict()[first_key], merged[1][first_key], atol=1e-6, rtol=1e-5
    )


def test_reset_member_is_seeded_and_fresh():
    tok = models.load_tokenizer("tiny:llama")
    model = build_reward_model(RewardModelConfig(model="tiny:llama", lora_r=2), tok, torch.device("cpu"))
    trained_like(model, seed=0)
    ens.reset_member(model, seed=5, zero_head=True)
    first = ens.member_weights(model)
    a_first = [next(iter(layer.lora_A.values())).weight.clone() for layer in ens.lora_layers(model)]
    assert all(float(d.abs().max()) == 0 for d in first.deltas)  # B is zero again: the update starts at 0
    assert float(first.head.abs().max()) == 0
    ens.reset_member(model, seed=5, zero_head=True)
    a_again = [next(iter(layer.lora_A.values())).weight.clone() for layer in ens.lora_layers(model)]
    ens.reset_member(model, seed=6, zero_head=True)
    a_other = [next(iter(layer.lora_A.values())).weight for layer in ens.lora_layers(model)]
    assert all(torch.equal(x, y) for x, y in zip(a_first, a_again))
    assert not all(torch.equal(x, y) for x, y in zip(a_first, a_other))


def test_bootstrap_and_seeds_and_checks():
    sample = ens.bootstrap_sample(200, seed=3)
    assert sample == ens.bootstrap_sample(200, seed=3) and len(sample) == 200
    assert 100 < len(set(sample)) < 160  # with replacement: about 1 - 1/e of the pairs appear
    assert ens.member_seeds(7, 3) == [7, 1007, 2007]
    with pytest.raises(ValueError, match="use_lora"):
        ens.check_ensemble(2, use_lora=False)
    with pytest.raises(ValueError, match=">= 1"):
        RewardModelConfig(model="tiny:llama", ensemble=0).check()


def test_accuracy_vs_gold_leaves_gold_ties_out_and_counts_reward_ties_wrong():
    rows = [{"gold_chosen": g, "gold_rejected": 0.0} for g in (1.0, 1.0, -1.0, 0.0, 1.0)]
    out = ens.accuracy_vs_gold(rows, np.array([2.0, 0.0, 0.0, 5.0, 1.0]), np.array([1.0, 1.0, 1.0, 0.0, 1.0]))
    assert out["accuracy_vs_gold"] == 0.5  # right, wrong, right, (gold tie: out), reward tie: wrong
    assert out["ci"][0] < 0.5 < out["ci"][1]
