"""Tests for rlhf_lib.compare: best-of-N maths (estimator vs brute force, analytic KL vs exact and Monte-Carlo),
the policy-folder contract, and -- slow -- DPO / RLOO / GRPO raising their objective on a toy task with a known
answer (tests/toy_task.py), each trained policy going through the comparison's evaluation code."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import toy_task

from rlhf_lib.compare import best_of_n as bon
from rlhf_lib.compare.common import MethodInputs, load_policy_folder, save_policy, token_id_reward
from rlhf_lib.compare.dpo import DPOMethodConfig, train_dpo
from rlhf_lib.compare.online import GRPOMethodConfig, OnlineMethodConfig, RLOOMethodConfig, train_online
from rlhf_lib.core import config
from rlhf_lib.evaluate import stage as evaluate
from rlhf_lib.lm import models

# ----------------------------------------------------------------------------------------------------------------
# best-of-N maths


def brute_force_best_of_n(rm: np.ndarray, value: np.ndarray, n: int) -> float:
    """Mean over every n-subset of `value` at the subset's RM-argmax (ties: the later sample)."""
    picks = [value[max(subset, key=lambda i: (rm[i], i))] for subset in itertools.combinations(range(rm.size), n)]
    return float(np.mean(picks))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_estimator_equals_enumeration_of_subsets(seed):
    rng = np.random.default_rng(seed)
    rm = rng.integers(0, 4, size=8).astype(float)  # ties on purpose
    gold = rng.normal(size=8)
    for n in range(1, 9):
        w = bon.selection_weights(rm, n)
        assert w.sum() == pytest.approx(1.0)
        assert float(w @ gold) == pytest.approx(brute_force_best_of_n(rm, gold, n), abs=1e-12), n
    assert bon.selection_weights(rm, 1) == pytest.approx(np.full(8, 1 / 8))  # N = 1: the plain mean
    assert bon.selection_weights(rm, 8)[np.lexsort((np.arange(8), rm))[-1]] == 1.0  # N = M: the max


def test_analytic_kl_is_the_exact_kl_for_distinct_rewards_and_a_large_support():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(20000, 50.0))  # no single outcome carries much mass
    rewards = rng.normal(size=probs.size)  # continuous-valued: distinct
    for n in (1, 2, 4, 16, 32):
        exact = bon.best_of_n_kl(probs, rewards, n)
        assert exact == pytest.approx(bon.analytic_kl(n), abs=2e-3), n
    assert bon.analytic_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_analytic_kl_is_an_upper_bound_that_ties_and_heavy_outcomes_break():
    probs = np.array([0.5, 0.2, 0.2, 0.1])
    for rewards in ([3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]):
        for n in (2, 4, 8):
            assert bon.best_of_n_kl(probs, rewards, n) < bon.analytic_kl(n) - 1e-3
    assert bon.best_of_n_kl(probs, [1.0] * 4, 8) == pytest.approx(0.0, abs=1e-12)  # all tied: best-of-N = reference


@pytest.mark.parametrize("n", [2, 4, 8])
def test_monte_carlo_best_of_n_matches_the_exact_distribution_and_kl(n):
    rng = np.random.default_rng(n)
    k = 50
    probs = rng.dirichlet(np.full(k, 5.0))
    rewards = rng.permutation(k).astype(float)
    draws = rng.choice(k, size=(400_000, n), p=probs)  # n samples from the reference, pick the highest reward
    picked = draws[np.arange(draws.shape[0]), np.argmax(rewards[draws], axis=1)]
    freq = np.bincount(picked, minlength=k) / picked.size
    exact = bon.best_of_n_distribution(probs, rewards, n)
    assert np.abs(freq - exact).max() < 4e-3
    mc_kl = bon.kl_divergence(freq, probs)
    assert mc_kl == pytest.approx(bon.best_of_n_kl(probs, rewards, n), abs=0.01)
    assert mc_kl == pytest.approx(bon.analytic_kl(n), abs=0.06)  # 50 outcomes: near the continuous formula


def make_pool(rm: np.ndarray, gold: np.ndarray) -> bon.Pool:
    p, m = rm.shape
    return bon.Pool(
        rm=rm,
        gold=gold,
        lengths=np.full((p, m), 3.0),
        eos=np.ones((p, m)),
        texts=[[f"p{i}s{j}" for j in range(m)] for i in range(p)],
    )


def test_pool_entries_n1_is_the_pool_mean_and_the_oracle_dominates():
    rng = np.random.default_rng(0)
    rm, gold = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    pool = make_pool(rm, gold)
    ref = np.zeros(6)
    one = bon.pool_entry(pool, 1, ref, "gold")
    assert one["gold_score"] == pytest.approx(gold.mean()) and one["kl"] == pytest.approx(0.0, abs=1e-12)
    assert one["kl_analytic"] == 0.0
    full = bon.pool_entry(pool, 5, ref, "gold")
    assert full["rm_score"] == pytest.approx(rm.max(1).mean())
    assert full["gold_score"] == pytest.approx(gold[np.arange(6), rm.argmax(1)].mean())
    assert full["win_rate_vs_ref"] == pytest.approx((gold[np.arange(6), rm.argmax(1)] > 0).mean())
    for n in (2, 3, 5):
        oracle = bon.pool_entry(pool, n, ref, "gold", oracle=True)
        assert oracle["gold_score"] >= bon.pool_entry(pool, n, ref, "gold")["gold_score"] - 1e-12
        assert 0 <= oracle["win_rate_ci"][0] <= oracle["win_rate_vs_ref"] <= oracle["win_rate_ci"][1] <= 1
    # measured KL over a pool of 5 distinct samples: the exact value of the 5-atom empirical distribution
    assert full["kl"] == pytest.approx(bon.best_of_n_kl(np.full(5, 0.2), rm[0], 5))
    with pytest.raises(ValueError, match="ns has"):
        bon.BestOfNConfig(ns=[1, 64], n_samples=32).check()


def test_a_pool_ranked_by_another_reward_picks_that_rewards_argmax_and_reports_the_models_score():
    rng = np.random.default_rng(3)
    rm, gold, other = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    pool = make_pool(rm, gold)
    pool.rewards["min"] = other
    ref = np.zeros(4)
    for n in (1, 3, 6):
        by_min = bon.pool_entry(pool, n, ref, "gold", reward="min")
        want_gold = np.mean([brute_force_best_of_n(other[p], gold[p], n) for p in range(4)])
        want_rm = np.mean([brute_force_best_of_n(other[p], rm[p], n) for p in range(4)])
        assert by_min["gold_score"] == pytest.approx(want_gold) and by_min["rm_score"] == pytest.approx(want_rm)
        assert by_min["reward_score"] == pytest.approx(np.mean([brute_force_best_of_n(o, o, n) for o in other]))
        assert (by_min["curve"], by_min["reward"], by_min["method"]) == ("best_of_n:min", "min", bon.METHOD)
    assert bon.pool_entry(pool, 6, ref, "gold")["curve"] == "best_of_n"
    assert bon.chosen_texts(pool, 6, 2, "min") == [f"p{p}s{int(np.argmax(other[p]))}" for p in range(2)]
    cfg = bon.BestOfNConfig(ns=[1, 6], n_samples=6, rewards=["model", "min"], oracle=False)
    assert [e["curve"] for e in bon.best_of_n_entries(cfg, pool, ref, "gold")] == ["best_of_n"] * 2 + [
        "best_of_n:min"
    ] * 2
    with pytest.raises(ValueError, match="not scored by reward 'uwo'"):
        bon.pool_entry(pool, 2, ref, "gold", reward="uwo")
    for bad in (["model", "model"], ["median"], []):
        with pytest.raises(ValueError, match="best_of_n.rewards"):
            bon.BestOfNConfig(rewards=bad).check()


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.05), (0.5, 0.2)])
def test_best_of_n_fit_recovers_gaos_coefficients_and_peak(alpha, beta):
    kl = np.array([bon.analytic_kl(n) for n in (1, 2, 4, 8, 16, 32, 64)])
    d = np.sqrt(kl)
    fit = bon.fit_best_of_n(kl, d * (alpha - beta * d))
    assert (fit["alpha"], fit["beta"]) == (pytest.approx(alpha), pytest.approx(beta))
    assert fit["n_points"] == 6 and fit["r2"] == pytest.approx(1.0)  # N = 1 (KL 0) is the reference, left out
    assert fit["kl_at_peak"] == pytest.approx((alpha / (2 * beta)) ** 2)
    assert fit["gain_at_peak"] == pytest.approx(alpha**2 / (4 * beta))
    rising = bon.fit_best_of_n(kl, 0.2 * d + 0.01 * d**2)  # still rising: no peak to report
    assert rising["beta"] < 0 and rising["kl_at_peak"] is None
    assert bon.fit_best_of_n([0.0, 1.0], [0.0, 0.3])["alpha"] is None  # one informative point fits nothing
    entries = [{"method": bon.METHOD, "curve": "best_of_n", "kl_analytic": k, "gold_score": 0.5 + g}
               for k, g in zip(kl, d * (alpha - beta * d))]  # fmt: skip
    fits = bon.best_of_n_fits(entries + [{"method": "ppo", "kl_analytic": None, "gold_score": 9.0}], 0.5)
    assert list(fits) == ["best_of_n"] and fits["best_of_n"]["alpha"] == pytest.approx(alpha)
    assert bon.best_of_n_fits(entries, None) == {}


def test_policy_interpolation_is_the_mean_update_per_tensor_and_averages_lora_products_not_factors():
    from rlhf_lib.compare.average import interpolate

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=gen)
    factors = [(torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen)) for _ in range(3)]
    members = [{"w": w + b @ a, "bias": torch.full((5,), float(i))} for i, (b, a) in enumerate(factors)]
    reference = {"w": w, "bias": torch.zeros(5)}
    for eta in (0.25, 0.5, 1.0):
        out = interpolate(reference, members, eta)
        naive = torch.empty(6, 5)
        for i in range(6):
            for j in range(5):
                naive[i, j] = w[i, j] + eta * sum(float(m["w"][i, j] - w[i, j]) for m in members) / 3
        assert torch.allclose(out["w"], naive, atol=1e-5)
        assert torch.allclose(out["bias"], torch.full((5,), eta * 1.0))  # the mean of 0, 1, 2, scaled
    mean_b = sum(b for b, _ in factors) / 3
    mean_a = sum(a for _, a in factors) / 3
    assert not torch.allclose(interpolate(reference, members, 1.0)["w"], w + mean_b @ mean_a, atol=1e-3)
    assert torch.equal(interpolate(reference, members[:1], 1.0)["w"], members[0]["w"])
    with pytest.raises(ValueError, match="policy 1 has w missing"):
        interpolate(reference, [members[0], {"bias": torch.zeros(5)}], 0.5)


# ----------------------------------------------------------------------------------------------------------------
# configs, reward, policy folders


@pytest.mark.parametrize("cls", [bon.BestOfNConfig, DPOMethodConfig, RLOOMethodConfig, GRPOMethodConfig])
def test_every_method_config_field_has_help_text(cls):
    comments = config.field_comments(cls)
    import dataclasses

    assert [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)] == []


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        RLOOMethodConfig(per_device_train_batch_size=6, num_generations=4).check()
    with pytest.raises(ValueError, match="dpo.betas"):
        DPOMethodConfig(betas=[]).check()
    with pytest.raises(ValueError, match="num_generations"):
        OnlineMethodConfig(num_generations=1, per_device_train_batch_size=4).check()
    with pytest.raises(ValueError, match="GRPOMethodConfig.reward = 'median' is not a reward; use one of model"):
        GRPOMethodConfig(reward="median").check()


def test_token_id_reward_scores_prompt_plus_completion_ids_and_counts_them():
    seen = []

    def scorer(seqs):
        seen.extend(seqs)
        return np.array([float(len(s)) for s in seqs])

    reward = token_id_reward(scorer, "query_ids", mean=1.0, std=2.0)
    out = reward(prompts=["x", "y"], completions=["", ""], completion_ids=[[5, 6, 1], [7]], query_ids=[[1, 2], [3]])
    assert seen == [[1, 2, 5, 6, 1], [3, 7]]
    assert out == pytest.approx([(5 - 1) / 2, (2 - 1) / 2])
    assert (reward.generated_tokens, reward.generated_responses) == (4, 2)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    folder = toy_task.build_model(root / "model")
    tokenizer = models.load_tokenizer(str(folder))
    toy_task.write_data(root / "data", tokenizer)
    return root, str(folder), tokenizer


def test_saved_policy_loads_through_the_evaluation_loader_and_adapters_merge(toy, tmp_path):
    root, model_ref, tokenizer = toy
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        models.load_causal_lm(model_ref, tokenizer),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    ids = torch.tensor([[2, 3, 4, 5]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")  # a LoRA adapter folder
    save_policy(model, tokenizer, tmp_path / "policy")  # merged, as PPO's final policy
    assert not (tmp_path / "policy" / "adapter_config.json").exists()
    cfg = evaluate.EvalConfig(model=model_ref, device="cpu")
    from rlhf_lib.core.runs import Run

    loaded = evaluate.default_policy_loader(cfg, Run(tmp_path), tokenizer, torch.device("cpu"))(tmp_path / "policy")
    merged = load_policy_folder(tmp_path / "adapter", model_ref, tokenizer)
    with torch.no_grad():
        for m in (loaded, merged):
            assert torch.allclose(m(input_ids=ids).logits, expected, atol=1e-5)
    base = models.load_causal_lm(model_ref, tokenizer)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)  # the adapter changed something


# ----------------------------------------------------------------------------------------------------------------
# learning on the toy task (slow)

RESPONSE_LENGTH = 4


def toy_context(root: Path, model_ref: str, tokenizer):
    """The comparison's evaluation context on the toy eval prompts, reward = the target-word fraction."""
    from rlhf_lib.compare import runner as compare
    from rlhf_lib.core.io import write_json_atomic
    from rlhf_lib.core.runs import Run

    run = Run(root)
    write_json_atomic(run.manifest_path, {"stages": {}})
    ev = evaluate.EvalConfig(
        model=model_ref,
        device="cpu",
        dtype="float32",
        seed=1,
        response_length=RESPONSE_LENGTH,
        temperature=1.0,
        batch_size=16,
    )

    def scorer(seqs):
        return toy_task.target_fraction(seqs, RESPONSE_LENGTH)

    return compare.make_context(ev, run, rm_scorer=scorer, gold_scorer=None), scorer


def trained_reward(ctx, folder: Path) -> float:
    from rlhf_lib.compare import runner as compare

    policy = evaluate.default_policy_loader(ctx.eval_cfg, None, ctx.tokenizer, ctx.settings.device)(folder / "policy")
    entry, _ = compare.evaluate_policy(ctx, policy, "method", "test")
    assert entry["kl"] > 0.05  # it moved away from the reference, and the evaluation measured it
    return entry["rm_score"]


@pytest.mark.slow
def test_dpo_learns_to_prefer_the_chosen_word(toy):
    root, model_ref, tokenizer = toy
    ctx, _ = toy_context(root, model_ref, tokenizer)
    inputs = MethodInputs(model_ref, root / "data", root / "no_rm")
    cfg = DPOMethodConfig(
        betas=[0.1],
        learning_rate=3e-2,
        num_train_epochs=4.0,
        per_device_train_batch_size=8,
        lora_r=8,
        lora_alpha=16,
        lora_target_modules=["all-linear"],
    )
    record = train_dpo(cfg, inputs, 0.1, root / "dpo")
    margins = [r["rewards/margins"] for r in record["log_history"] if "rewards/margins" in r]
    assert margins[-1] > margins[0]  # TRL's own metric: the implicit reward margin grew
    before = float(ctx.ref_rm.mean())
    after = trained_reward(ctx, root / "dpo")
    assert after > before + 0.3, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rloo", "grpo"])
def test_rloo_and_grpo_raise_the_reward(toy, kind):
    root, model_ref, tokenizer = toy
    ctx, scorer = toy_context(root, model_ref, tokenizer)
    inputs = MethodInputs(model_ref, root / "data", root / "no_rm")
    cls = RLOOMethodConfig if kind == "rloo" else GRPOMethodConfig
    cfg = cls(
        betas=[0.01],
        learning_rate=3e-2,
        max_steps=12,
        per_device_train_batch_size=32,
        num_generations=8,
        lora_r=8,
        lora_alpha=16,
        lora_target_modules=["all-linear"],
    )
    record = train_online(kind, cfg, inputs, 0.01, root / kind, RESPONSE_LENGTH, 1.0, scorer=scorer)
    assert record["generated_responses"] == 12 * 32 and record["generated_tokens"] > 0
    before = float(ctx.ref_rm.mean())
    after = trained_reward(ctx, root / kind)
    assert after > before + 0.3, (before, after)


def test_check_trained_names_the_first_input_that_differs(tmp_path):
    from rlhf_lib.compare.common import check_trained, setting_inputs, write_train_record
    from rlhf_lib.compare.dpo import DPOMethodConfig
    from rlhf_lib.core.config import ConfigError

    inputs = MethodInputs("model", tmp_path / "data", tmp_path / "rm", seed=0)
    trained = setting_inputs(inputs, DPOMethodConfig(max_pairs=8))
    write_train_record(tmp_path, {"method": "dpo", "inputs": trained})
    check_trained(tmp_path, trained)  # the same inputs: reused
    check_trained(tmp_path, setting_inputs(inputs, DPOMethodConfig(max_pairs=8, betas=[0.5])))  # betas: one each
    with pytest.raises(ConfigError, match=r"train\.json: was trained with config\.max_pairs = 8, this .* has 16"):
        check_trained(tmp_path, setting_inputs(inputs, DPOMethodConfig(max_pairs=16)))
    with pytest.raises(ConfigError, match="was trained with seed = 0"):
        check_trained(
            tmp_path,
            setting_inputs(
                MethodInputs("model", tmp_path / "data", tmp_path / "rm", seed=1), DPOMethodConfig(max_pairs=8)
            ),
        )
    write_train_record(tmp_path, {"method": "dpo"})
    with pytest.raises(ConfigError, match="records no inputs"):
        check_trained(tmp_path, trained)
