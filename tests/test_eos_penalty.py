"""`missing_eos_penalty` (TRL's name; recommended by TRL's PPO docs and the N+ implementation details of RLHF with
PPO): a response cut at `response_length` without EOS loses exactly the configured amount, and training against
it teaches the policy to end its answers.

Tiny random model at temperature 0.1: its most frequent token is sampled about once in 25 tokens, so with that
token declared EOS about a quarter of 8-token responses end on their own -- a learnable signal with a known answer.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch

from rlhf_lib.lm import models
from rlhf_lib.ppo import trainer as ppo
from rlhf_lib.ppo.metrics import read_jsonl

MODEL = "tiny:llama"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    """A tokenizer whose EOS is the tiny policy's most frequent token at T = 0.1, and the prompts."""
    tok = models.load_tokenizer(MODEL)
    topics = "apples pears cats dogs rain snow music books trees rivers cars bikes".split()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Say something about {t}."}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for t in topics
    ]
    torch.manual_seed(0)
    model = models.load_causal_lm(MODEL, tok)
    ids, mask = ppo.left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    counts: collections.Counter = collections.Counter()
    for _ in range(3):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.1,
            top_k=0,
            top_p=1.0,
            max_new_tokens=8,
            pad_token_id=tok.pad_token_id,
        )
        counts.update(out[:, ids.shape[1] :].flatten().tolist())
    for special in (tok.pad_token_id, tok.eos_token_id):
        counts.pop(special, None)
    tok = copy.deepcopy(tok)
    tok.eos_token = tok.convert_ids_to_tokens(counts.most_common(1)[0][0])
    assert tok.eos_token_id != tok.pad_token_id
    return tok, prompts


def zero_reward(query_responses, attention_mask, context_length):
    return torch.zeros(query_responses.shape[0])


def train(setup, tmp_path, penalty: float | None, updates: int, seed: int = 0, kl_coef: float = 0.01) -> list[dict]:
    tok, prompts = setup
    cfg = ppo.PPOConfig(
        model=MODEL,
        dtype="float32",
        device="cpu",
        use_lora=False,
        total_episodes=8 * updates,
        batch_size=8,
        response_length=8,
        temperature=0.1,
        learning_rate=2e-4,
        kl_coef=kl_coef,
        save_every=0,
        sample_every=0,
        lr_scheduler_type="constant",
        seed=seed,
        missing_eos_penalty=penalty,
    )
    torch.manual_seed(seed)
    policy = models.load_causal_lm(MODEL, tok)
    value = ppo.ScalarHead(models.load_sequence_classifier(MODEL, tok))
    trainer = ppo.PPOTrainer(
        cfg, tok, policy, copy.deepcopy(policy), value, zero_reward, prompts, tmp_path / "ppo", tmp_path / "checkpoints"
    )
    trainer.train()
    return read_jsonl(tmp_path / "ppo" / "metrics.jsonl")


def eos_rate(row: dict) -> float:
    return row["val/num_eos_tokens"] / 8  # truncation leaves at most one EOS per response


def test_a_response_without_eos_loses_exactly_the_penalty(setup, tmp_path):
    rows = train(setup, tmp_path, penalty=0.75, updates=2)
    for row in rows:  # zero reward: the score is the penalty alone, so its mean is -0.75 x the unfinished fraction
        assert 0.0 < eos_rate(row) < 1.0, "the check needs both finished and unfinished responses"
        assert row["objective/scores"] == pytest.approx(-0.75 * (1.0 - eos_rate(row)), abs=1e-6)


def test_no_penalty_means_no_score(setup, tmp_path):
    rows = train(setup, tmp_path, penalty=None, updates=1)
    assert rows[0]["objective/scores"] == 0.0


@pytest.mark.slow
def test_training_with_the_penalty_raises_the_eos_rate(setup, tmp_path):
    # no KL penalty in either run: a per-token KL penalty alone favours short (ended) answers, so with it the control
    # would learn to stop too, and the penalty would not be the only signal. With zero reward the control still moves
    # (its advantages are whitened value-head noise), so one seed of it can drift either way: both arms run 3 seeds.
    seeds = (0, 1, 2)
    penalised = [train(setup, tmp_path / f"penalty{s}", penalty=1.0, updates=16, seed=s, kl_coef=0.0) for s in seeds]
    control = [train(setup, tmp_path / f"control{s}", penalty=0.0, updates=16, seed=s, kl_coef=0.0) for s in seeds]

    def mean_rate(runs: list[list[dict]], part: slice) -> float:
        return sum(eos_rate(r) for rows in runs for r in rows[part]) / sum(len(rows[part]) for rows in runs)

    start = mean_rate(penalised, slice(0, 1))  # the first update's rollouts come from the untrained policy
    end, end_control = mean_rate(penalised, slice(-3, None)), mean_rate(control, slice(-3, None))
    trajectories = {"penalty": [[eos_rate(r) for r in rows] for rows in penalised]}
    trajectories["control"] = [[eos_rate(r) for r in rows] for rows in control]
    assert end > start + 0.3, trajectories
    assert end > end_control + 0.15, trajectories  # measured: 0.94 against 0.63 (the control drifts up from 0.21)
