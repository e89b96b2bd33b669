"""Combined ensemble rewards: the shared-trunk member stack against each member's own merged model, the saved
members' round trip, and the scorers every consumer uses."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_reward_ensemble import trained_like

from rlhf_lib.lm import models
from rlhf_lib.reward import combined
from rlhf_lib.reward import ensemble as ens
from rlhf_lib.reward.scoring import score_sequences
from rlhf_lib.reward.train import RewardModelConfig, build_reward_model


def build_members(top: int, k: int = 3):
    """k members of a tiny llama RM (adapters in the top ``top`` blocks; 0 = all): their factors, the layer names,
    each member's own merged model, and WARM (their weight average) as the plain model the stage saves."""
    tok = models.load_tokenizer("tiny:llama")
    base = build_reward_model(RewardModelConfig(model="tiny:llama", lora_r=2, trainable_top_layers=top), tok, "cpu")
    factors, weights, merged = [], [], []
    for m in range(k):
        model = trained_like(copy.deepcopy(base), seed=m)
        factors.append(combined.member_factors(model))
        weights.append(ens.member_weights(model))
        merged.append(copy.deepcopy(model).merge_and_unload().eval())
    names = combined.adapted_layer_names(base)
    warm = ens.WeightSetter(copy.deepcopy(base)).load(ens.average(weights)).eval()
    return tok, factors, names, merged, warm


def batch(tok, side: str):
    """Three sequences of different lengths padded on ``side``: (B, T) ids and mask."""
    from rlhf_lib.core.io import pad

    seqs = [[5, 9, 13, 2, 7], [4, 8], [11, 3, 6, 12, 10, 15, 1]]
    return pad(seqs, tok.pad_token_id, side=side)


@pytest.mark.parametrize("top,side", [(1, "right"), (1, "left"), (0, "right")])
def test_member_scores_equal_each_members_own_model(top, side):
    tok, factors, names, merged, warm = build_members(top)
    stats = [{"mean": 0.0, "std": 1.0}] * len(factors)
    stack = combined.MemberStack(warm, factors, names, stats, "mean", 0.5)
    n_blocks = len(models.transformer_blocks(warm))
    assert stack.first_block == (n_blocks - top if top else 0)
    ids, mask = batch(tok, side)
    got = stack.member_scores(ids, mask)  # (k, B)
    expected = torch.stack([score_sequences(m, ids, mask) for m in merged])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert float((expected[0] - expected[1]).abs().max()) > 1e-2  # the members do differ


def test_combined_reward_standardises_then_combines_as_the_report():
    tok, factors, names, merged, warm = build_members(1)
    ids, mask = batch(tok, "right")
    raw = torch.stack([score_sequences(m, ids, mask) for m in merged]).numpy()  # (k, B)
    stats = [{"mean": 0.3 * m, "std": 1.0 + m} for m in range(len(factors))]
    mean, std = np.array([s["mean"] for s in stats]), np.array([s["std"] for s in stats])
    for how in ens.COMBINATIONS:
        stack = combined.MemberStack(warm, factors, names, stats, how, 0.7)
        expected = ens.combine(ens.standardise(raw, mean, std), how, 0.7)
        np.testing.assert_allclose(stack(ids, mask).numpy(), expected, atol=1e-4, rtol=1e-4)
        reward = combined.CombinedReward(stack)(ids, mask, context_length=2)
        np.testing.assert_allclose(reward.numpy(), expected, atol=1e-4, rtol=1e-4)


def test_saved_members_round_trip_through_the_folder_scorer(tmp_path):
    tok, factors, names, merged, warm = build_members(1)
    warm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    combined.save_members(tmp_path, factors, names)
    read, read_names = combined.read_members(tmp_path)
    assert read_names == names and len(read) == len(factors)
    for a, b in zip(read, factors):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(FileNotFoundError, match="ensemble.json"):
        combined.load_member_stack(tmp_path, "mean")
    stats = [{"mean": 0.1, "std": 2.0}, {"mean": -0.2, "std": 0.5}, {"mean": 0.0, "std": 1.0}]
    (tmp_path / combined.ENSEMBLE_FILE).write_text(json.dumps({"standardisation": stats, "uwo_coef": 0.25}))
    score = combined.sequence_scorer(tmp_path, "uwo", torch.device("cpu"), torch.float32, batch_size=2)
    seqs = [[5, 9, 13, 2, 7], [4, 8], [11, 3, 6, 12, 10, 15, 1]]
    ids, mask = batch(tok, "right")
    raw = torch.stack([score_sequences(m, ids, mask) for m in merged]).numpy()
    z = ens.standardise(raw, np.array([s["mean"] for s in stats]), np.array([s["std"] for s in stats]))
    np.testing.assert_allclose(score(seqs), ens.combine(z, "uwo", 0.25), atol=1e-4, rtol=1e-4)


def test_a_single_model_folder_says_what_to_do(tmp_path):
    tok, _, _, _, warm = build_members(1, k=1)
    warm.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="reward_model.ensemble > 1"):
        combined.read_members(tmp_path)
    with pytest.raises(ValueError, match="ppo.reward = 'median'.*model, mean, min, uwo"):
        combined.check_reward("median", "ppo.reward")
    combined.check_reward("model", "ppo.reward")


def test_gpt2_members_cannot_be_split():
    tok = models.load_tokenizer("tiny:gpt2")
    model = build_reward_model(RewardModelConfig(model="tiny:gpt2", lora_r=2), tok, "cpu")
    with pytest.raises(ValueError, match="nn.Linear"):  # GPT-2's Conv1D layers store their weights transposed
        combined.member_factors(model)
    plain = model.merge_and_unload()
    head = {"head": ens.score_head(plain).weight.detach().clone()}
    with pytest.raises(ValueError, match="Llama-family"):
        combined.MemberStack(plain, [head], [], [{"mean": 0, "std": 1}], "mean", 0.5)
