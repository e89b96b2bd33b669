"""Tests for rlhf_lib.reward.train, reward_scoring and reward_metrics: the three defects of the original notebook,
tie/degenerate handling, tokenizer checks, score extraction under padding, and a tiny-model learning test on a
synthetic task with a known answer."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_lib.core import config, runs
from rlhf_lib.lm import models
from rlhf_lib.reward import ensemble as ens
from rlhf_lib.reward.metrics import (
    DegenerateRewardsError,
    baseline_accuracy,
    bt_loss,
    calibration_table,
    check_rewards,
    expected_calibration_error,
    length_predictions,
    pairwise_accuracy,
    strength_table,
)
from rlhf_lib.reward.scoring import (
    TokenizerMismatchError,
    check_same_tokenizer,
    load_reward_model,
    score_pairs,
    score_sequences,
)
from rlhf_lib.reward.train import (
    RewardModelConfig,
    _save_model,
    build_reward_model,
    evaluate_reward_model,
    read_pairs,
    train_reward_model,
)

WORDS = "the a movie film plot actor scene music story was is very quite long short slow fast it".split()


# ----------------------------------------------------------------------------
# helpers: pair files that follow the data contract (CONTEXT.md), tokenized with the tiny model's tokenizer


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny:llama")


def make_pairs(tok, n: int, seed: int) -> list[dict]:
    """Synthetic task with a known answer: chosen holds "excellent", rejected "terrible", otherwise alike.

    Both responses get one keyword and random filler of the same length distribution, so length says nothing;
    each response ends with EOS (finished) or not at random, as PPO responses cut at the limit would.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Write a short review of film {rng.randint(0, 99)}."}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

        def response(keyword: str) -> tuple[str, list[int]]:
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
            words.insert(rng.randrange(len(words) + 1), keyword)
            body = " ".join(words)
            ids = tok(body, add_special_tokens=False)["input_ids"]
            return body, ids + ([tok.eos_token_id] if rng.random() < 0.5 else [])

        (chosen, chosen_ids), (rejected, rejected_ids) = response("excellent"), response("terrible")
        rows.append(
            {
                "id": f"s{seed}-{i}",
                "prompt": msgs,
                "prompt_text": text,
                "chosen": chosen,
                "rejected": rejected,
                "prompt_ids": tok(text, add_special_tokens=False)["input_ids"],
                "chosen_ids": chosen_ids,
                "rejected_ids": rejected_ids,
                "score_chosen": None,
                "score_rejected": None,
                "gold_chosen": 0.5 + rng.random(),
                "gold_rejected": -0.5 - rng.random(),
                "margin": 0.0,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_run(
    tmp_path: Path, tok, n_train: int = 160, n_eval: int = 40, **overrides
) -> tuple[RewardModelConfig, runs.Run]:
    """A run whose data stage is done (pair files written here), and a fast tiny-model RM config."""
    values = dict(
        run="rm",
        outputs_dir=str(tmp_path),
        model="tiny:llama",
        use_lora=False,
        learning_rate=1e-3,
        head_learning_rate=1e-2,
        num_train_epochs=3.0,
        per_device_train_batch_size=8,
        logging_steps=5,
        warmup_steps=0.0,
    )
    values.update(overrides)
    cfg = config.validate(RewardModelConfig, values, "test")
    run = runs.run_for(cfg)
    write_jsonl(run.data_dir / "train_pairs.jsonl", make_pairs(tok, n_train, seed=1))
    write_jsonl(run.data_dir / "eval_pairs.jsonl", make_pairs(tok, n_eval, seed=2))
    runs.finish_stage(run, "data", {})
    return cfg, runs.start_stage(cfg, "reward_model")


def random_head_classifier(ref: str, seed: int = 0):
    """A tiny sequence classifier with a non-zero random head (scores differ between sequences)."""
    tokenizer = models.load_tokenizer(ref)
    model = models.load_sequence_classifier(ref, tokenizer)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------
# pure evaluation maths


def test_accuracy_counts_ties_as_wrong():
    chosen = np.array([1.0, 0.5, 0.2, 0.0])
    rejected = np.array([0.0, 0.5, 0.2, 1.0])  # one right, two ties, one wrong
    assert pairwise_accuracy(chosen, rejected) == 0.25
    assert pairwise_accuracy(np.zeros(10), np.zeros(10)) == 0.0  # an untrained zero head is not "50 %"


def test_bt_loss_values():
    assert bt_loss(np.zeros(5)) == pytest.approx(math.log(2))
    assert bt_loss(np.array([2.0])) == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))))
    assert math.isfinite(bt_loss(np.array([-1000.0, 1000.0])))  # stable at extreme gaps


@pytest.mark.parametrize(
    "rewards",
    [
        np.array([0.1, float("nan"), 0.3]),
        np.array([1.0, float("inf")]),
        np.zeros(8),
        np.full(8, 3.25) + 1e-7 * np.arange(8),
    ],
)
def test_degenerate_rewards_fail_loudly(rewards):
    with pytest.raises(DegenerateRewardsError):
        check_rewards(rewards, min_std=1e-4, where="test")


def test_check_rewards_accepts_spread():
    check_rewards(np.array([0.0, 0.1, -0.2, 0.3]), min_std=1e-4, where="test")


def test_calibration_table_counts_both_orders():
    table = calibration_table(np.array([0.0, 0.0, 2.0]), bins=10)
    assert table["n"].sum() == 6  # each pair in both orders
    middle = table[(table["bin_low"] <= 0.5) & (table["bin_high"] > 0.5)].iloc[0]
    assert middle["observed"] == pytest.approx(0.5)  # a zero gap is right half of the time by construction
    high = table[table["mean_predicted"] > 0.8].iloc[0]
    assert high["observed"] == 1.0 and high["mean_predicted"] == pytest.approx(1 / (1 + math.exp(-2)))
    assert expected_calibration_error(table) == pytest.approx(2 * (1 - 1 / (1 + math.exp(-2))) / 6)


def test_length_baseline_fits_direction_on_train_and_halves_ties():
    def pair(lc, lr):
        return {"chosen_ids": [1] * lc, "rejected_ids": [1] * lr}

    train = [pair(2, 5), pair(3, 9), pair(9, 3)]  # shorter won 2 of 3 training pairs
    pred, direction = length_predictions(train, [pair(1, 4), pair(4, 1), pair(3, 3)])
    assert direction == "shorter" and pred.tolist() == [1.0, -1.0, 0.0]
    assert baseline_accuracy(pred, np.ones(3)) == pytest.approx((1 + 0 + 0.5) / 3)  # vs labels: chosen is right
    assert baseline_accuracy(pred, np.array([-1.0, -1.0, float("nan")])) == pytest.approx(0.5)  # gold; NaN skipped


def test_strength_table_bins_by_strength():
    import pandas as pd

    pairs = pd.DataFrame(
        {
            "strength": [0.1, 0.2, 0.9, 1.0],
            "correct": [False, True, True, True],
            "correct_vs_gold": [0.0, 1.0, 1.0, 1.0],
        }
    )
    table = strength_table(pairs, bins=2)
    assert table["n"].tolist() == [2, 2]
    assert table["accuracy"].tolist() == [0.5, 1.0]


# ----------------------------------------------------------------------------
# score at the last real token, whatever the padding side


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
def test_score_sequences_padding_invariant(ref):
    model, tokenizer = random_head_classifier(ref)
    seqs = [[5, 17, 230, 99, 12, tokenizer.eos_token_id], [44, 45], [7, 8, 9, 10]]
    single = torch.cat(
        [score_sequences(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs]
    )
    width = max(map(len, seqs)) + 2  # extra padding on every row
    for side in ("left", "right", "both"):  # "both": PPO's left-padded query + right-padded response
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            start = {"left": width - len(s), "right": 0, "both": (width - len(s)) // 2 + 1}[side]
            ids[i, start : start + len(s)], mask[i, start : start + len(s)] = torch.tensor(s), 1
        batched = score_sequences(model, ids, mask)
        assert batched.dtype == torch.float32 and batched.shape == (3,)
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5, msg=f"{side} padding changed the scores")
    assert single.std() > 1e-3  # the check above is not vacuous: the sequences get different scores


def test_score_sequences_ignores_pad_token_inside_mask():
    """The mask, not the pad id, decides where a sequence ends (a real token equal to the pad id is still read)."""
    model, tokenizer = random_head_classifier("tiny:llama")
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[5, 6, pad, pad], [5, 6, pad, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    scores = score_sequences(model, ids, mask)
    alone = score_sequences(model, torch.tensor([[5, 6, pad]]), torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(scores[:1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no real token"):
        score_sequences(model, ids, torch.zeros_like(mask))


# ----------------------------------------------------------------------------
# tokenizer sharing


def test_tokenizer_mismatch_is_refused():
    with pytest.raises(TokenizerMismatchError, match="policy"):
        check_same_tokenizer(models.load_tokenizer("tiny:gpt2"), models.load_tokenizer("tiny:llama"))
    check_same_tokenizer(models.load_tokenizer("tiny:llama"), models.load_tokenizer("tiny:llama"))
    other_pad = models.load_tokenizer("tiny:llama")
    other_pad.pad_token = "<|im_start|>"
    with pytest.raises(TokenizerMismatchError, match="pad_token_id"):
        check_same_tokenizer(other_pad, models.load_tokenizer("tiny:llama"))


def test_training_refuses_rm_base_with_another_tokenizer(tmp_path, tok):
    cfg, run = make_run(tmp_path, tok, n_train=8, n_eval=4, base_model="tiny:gpt2")
    with pytest.raises(TokenizerMismatchError, match="base_model"):
        train_reward_model(cfg, run)


# ----------------------------------------------------------------------------
# input checks


def test_pairs_with_missing_field_name_file_and_line(tmp_path, tok):
    rows = make_pairs(tok, 3, seed=0)
    del rows[1]["chosen_ids"]
    write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=r"p\.jsonl, line 2: missing field 'chosen_ids'"):
        read_pairs(tmp_path / "p.jsonl")


def test_use_margin_needs_margins(tmp_path, tok):
    cfg, run = make_run(tmp_path, tok, n_train=8, n_eval=4, use_margin=True)
    rows = read_pairs(run.data_dir / "train_pairs.jsonl")
    rows[2]["margin"] = None
    write_jsonl(run.data_dir / "train_pairs.jsonl", rows)
    with pytest.raises(ValueError, match="line 3.*margin"):
        train_reward_model(cfg, run)


def test_pad_id_inside_pairs_is_refused(tmp_path, tok):
    cfg, run = make_run(tmp_path, tok, n_train=8, n_eval=4)
    rows = read_pairs(run.data_dir / "train_pairs.jsonl")
    rows[0]["rejected_ids"] = rows[0]["rejected_ids"] + [tok.pad_token_id]
    write_jsonl(run.data_dir / "train_pairs.jsonl", rows)
    with pytest.raises(ValueError, match="pad token"):
        train_reward_model(cfg, run)


def test_config_fields_documented_and_checked():
    comments = config.field_comments(RewardModelConfig)
    import dataclasses

    missing = [f.name for f in dataclasses.fields(RewardModelConfig) if not comments.get(f.name)]
    assert not missing, f"fields without a trailing # comment: {missing}"
    own = {f.name for f in dataclasses.fields(RewardModelConfig)} - {
        f.name for f in dataclasses.fields(config.CommonConfig)
    }
    assert not [n for n in own if "=" in comments[n]], "papermill cannot parse a parameter line with '=' in its comment"
    RewardModelConfig().check()
    with pytest.raises(config.ConfigError, match="learning_rate"):
        config.validate(RewardModelConfig, {"learning_rate": 0.0}, "test")
    with pytest.raises(config.ConfigError, match="lora"):
        config.validate(RewardModelConfig, {"use_lora": True, "lora_target_modules": []}, "test")


@pytest.mark.parametrize("use_lora", [False, True])
def test_trainable_top_layers_freezes_the_rest(tok, use_lora):
    cfg = RewardModelConfig(model="tiny:llama", use_lora=use_lora, trainable_top_layers=1)
    model = build_reward_model(cfg, tok, torch.device("cpu"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("layers.0." not in n and "embed_tokens" not in n for n in trainable)
    assert any("layers.1." in n for n in trainable)
    assert any(n.endswith("score.weight") or "score.modules_to_save" in n for n in trainable)
    head = [p for n, p in model.named_parameters() if "score" in n and p.requires_grad]
    assert all(torch.count_nonzero(p) == 0 for p in head)  # zero-initialised head


def test_num_hidden_layers_keeps_the_bottom_blocks(tok):
    cfg = RewardModelConfig(model="tiny:llama", use_lora=False, num_hidden_layers=1)
    model = build_reward_model(cfg, tok, torch.device("cpu"))
    full = models.load_sequence_classifier("tiny:llama", tok)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, full.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        build_reward_model(RewardModelConfig(model="tiny:llama", num_hidden_layers=5), tok, torch.device("cpu"))


# ----------------------------------------------------------------------------
# defect 1: the trained model is the one saved and handed on


@pytest.mark.parametrize("use_lora,torch_compile", [(False, False), (True, False), (True, True)])
def test_saved_model_is_the_trained_one(tmp_path, tok, use_lora, torch_compile):
    lr = dict(learning_rate=5e-3) if use_lora else {}
    cfg, run = make_run(
        tmp_path, tok, n_train=32, n_eval=8, num_train_epochs=1.0, use_lora=use_lora, torch_compile=torch_compile, **lr
    )
    initial = models.load_sequence_classifier(cfg.model, tok).state_dict()
    trained = train_reward_model(cfg, run)
    assert trained.n_train_pairs == 32 and trained.seconds > 0 and trained.pairs_per_s > 0
    assert any("loss" in entry for entry in trained.log_history)

    model, tokenizer, stats = load_reward_model(run.reward_model_dir, require_stats=False)
    assert stats is None  # written by the evaluation
    saved = model.state_dict()
    assert set(saved) == set(initial)  # a plain classifier: LoRA merged, no peft keys
    changed = [k for k in saved if not torch.equal(saved[k], initial[k])]
    assert "score.weight" in changed
    assert any(k.startswith("model.layers.") for k in changed), "the body was not trained/saved"

    rows = read_pairs(run.data_dir / "eval_pairs.jsonl")
    in_memory = score_pairs(trained.model, rows, tokenizer.pad_token_id)
    reloaded = score_pairs(model, rows, tokenizer.pad_token_id)
    np.testing.assert_allclose(reloaded[0], in_memory[0], atol=1e-5)
    np.testing.assert_allclose(reloaded[1], in_memory[1], atol=1e-5)
    assert np.std(np.concatenate(reloaded)) > 1e-3
    assert not list(run.reward_model_dir.glob("checkpoint-*"))  # no checkpoint clutter
    assert all("forward" not in vars(b) for b in models.transformer_blocks(trained.model))  # eager again


def test_untrained_model_fails_evaluation(tmp_path, tok):
    """Defect 2: a zero-head (untrained) RM gives tied rewards; the stage must stop, not report ln 2 and 'accuracy'."""
    cfg, run = make_run(tmp_path, tok, n_train=8, n_eval=8)
    _save_model(build_reward_model(cfg, tok, torch.device("cpu")), tok, run.reward_model_dir)
    with pytest.raises(DegenerateRewardsError, match="constant"):
        evaluate_reward_model(cfg, run)
    assert not (run.reward_model_dir / "reward_stats.json").exists()


def test_load_reward_model_checks_policy_tokenizer(tmp_path, tok):
    cfg, run = make_run(tmp_path, tok, n_train=8, n_eval=8)
    _save_model(build_reward_model(cfg, tok, torch.device("cpu")), tok, run.reward_model_dir)
    with pytest.raises(FileNotFoundError, match="reward_stats.json"):
        load_reward_model(run.reward_model_dir)
    with pytest.raises(TokenizerMismatchError):
        load_reward_model(
            run.reward_model_dir, require_stats=False, policy_tokenizer=models.load_tokenizer("tiny:gpt2")
        )


# ----------------------------------------------------------------------------
# learning test: held-out accuracy rises well above chance on a task with a known answer


@pytest.mark.slow
@pytest.mark.parametrize("use_lora,top", [(False, 0), (True, 0), (True, 1)])
def test_reward_model_learns_synthetic_task(tmp_path, tok, use_lora, top):
    """top=1: only the top block trains, on the lower block's output computed once (the cached trunk)."""
    extra = dict(learning_rate=5e-3, lora_r=8, lora_alpha=16) if use_lora else {}
    cfg, run = make_run(
        tmp_path, tok, n_train=160, n_eval=48, use_lora=use_lora, eval_steps=20, trainable_top_layers=top, **extra
    )
    trained = train_reward_model(cfg, run)
    result = evaluate_reward_model(cfg, run)
    s = result.summary
    assert s["eval_accuracy"] >= 0.8, s
    assert s["eval_accuracy_vs_gold"] == s["eval_accuracy"]  # gold agrees with every label here
    assert abs(s["length_baseline_accuracy"] - 0.5) < 0.2  # length carries no signal by construction
    assert s["eval_loss"] < math.log(2)
    assert s["n_eval_pairs"] == 48 and s["n_train_pairs"] == 160
    assert set(result.pairs["id"]) == {r["id"] for r in read_pairs(run.data_dir / "eval_pairs.jsonl")}
    assert any("eval_loss" in e for e in trained.log_history)  # held-out curve during training

    _, _, stats = load_reward_model(run.reward_model_dir)
    assert stats["std"] > 0 and math.isfinite(stats["mean"])
    assert stats["mean"] == pytest.approx(result.pairs[["reward_chosen", "reward_rejected"]].to_numpy().mean())

    from rlhf_lib.reward.plots import plot_accuracy_by_strength, plot_calibration, plot_margins, plot_training_curve

    for fig in (
        plot_training_curve(trained.log_history, run),
        plot_calibration(result, run),
        plot_margins(result, run),
        plot_accuracy_by_strength(result, run),
    ):
        assert fig.axes
    assert len(list(run.plots_dir.glob("reward_*.png"))) == 4


@pytest.mark.slow
def test_ensemble_trains_members_on_one_trunk_and_saves_their_weight_average(tmp_path, tok):
    """k = 3 members on the cached trunk: a report of each, the combinations and WARM; the saved model is WARM, and
    member 0 is the single reward model of the same seed."""

    def noisy_gold(run):  # gold disagrees with the labels on every third held-out pair, so accuracies can differ
        path = run.data_dir / "eval_pairs.jsonl"
        rows = read_pairs(path)
        for i, r in enumerate(rows):
            if i % 3 == 0:
                r["gold_chosen"], r["gold_rejected"] = r["gold_rejected"], r["gold_chosen"]
        write_jsonl(path, rows)

    settings = dict(n_train=48, n_eval=30, use_lora=True, learning_rate=5e-3, lora_r=4, trainable_top_layers=1)
    settings.update(num_train_epochs=1.0, per_device_train_batch_size=4)
    cfg, run = make_run(tmp_path / "ensemble", tok, ensemble=3, **settings)
    noisy_gold(run)
    trained = train_reward_model(cfg, run)
    summary = evaluate_reward_model(cfg, run).summary
    report = json.loads((run.reward_model_dir / "ensemble.json").read_text())
    assert report["members"] == 3 and len(report["member"]) == 3 and len(report["standardisation"]) == 3
    for key in ("mean", "min", "uwo", "warm", "lmc_midpoint"):
        acc = report[key]["accuracy_vs_gold"]
        assert 0 <= report[key]["ci"][0] <= acc <= report[key]["ci"][1] <= 1
        assert summary[f"ensemble_{key}_accuracy_vs_gold"] == acc
    # the saved model is WARM: reloaded and scored sequence by sequence, it orders the pairs as the report's WARM
    assert summary["eval_accuracy_vs_gold"] == pytest.approx(report["warm"]["accuracy_vs_gold"], abs=1e-9)
    # the saved members, combined on one shared trunk, order the pairs as the report's combinations
    from rlhf_lib.reward.combined import sequence_scorer

    rows = read_pairs(run.data_dir / "eval_pairs.jsonl")
    for how in ("mean", "min", "uwo"):
        score = sequence_scorer(run.reward_model_dir, how, torch.device("cpu"), torch.float32, batch_size=8)
        chosen = score([r["prompt_ids"] + r["chosen_ids"] for r in rows])
        rejected = score([r["prompt_ids"] + r["rejected_ids"] for r in rows])
        assert ens.accuracy_vs_gold(rows, chosen, rejected) == report[how], how
    logs = json.loads((run.reward_model_dir / "training.json").read_text())
    assert logs["cached_trunk_blocks"] == 1 and len(logs["member_log_histories"]) == 3
    first_losses = [[e["loss"] for e in h if "loss" in e] for h in logs["member_log_histories"]]
    assert first_losses[0] != first_losses[1] != first_losses[2]  # each member its own seed
    assert trained.n_train_pairs == 48

    cfg1, run1 = make_run(tmp_path / "single", tok, ensemble=1, **settings)
    noisy_gold(run1)
    train_reward_model(cfg1, run1)
    single = evaluate_reward_model(cfg1, run1).summary
    assert single["eval_accuracy_vs_gold"] == pytest.approx(report["member"][0]["accuracy_vs_gold"], abs=1e-9)
    assert "ensemble_members" not in single and not (run1.reward_model_dir / "ensemble.json").exists()
