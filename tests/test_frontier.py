"""Tests for rlhf_lib.compare.frontier: points over seeds and over prompts, the paired difference against best-of-16,
the best trained point inside the KL budget, and each reward's accuracy vs gold, against hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhf_lib.compare import frontier
from rlhf_lib.core.io import write_json_atomic

T2, T3 = 4.302652729911275, 3.182446305284263  # Student t(0.975, 2) and t(0.975, 3), from a t table


def ppo(run: str, gold: list[float], kl: float) -> dict:
    return {"method": "ppo", "curve": f"ppo:{run}", "run": run, "setting": "final", "reward": "model", "kl": kl,
            "kl_analytic": None, "gold_score": float(np.mean(gold)), "gold_per_prompt": gold}  # fmt: skip


def bon(n: int, gold: list[float]) -> dict:
    return {"method": "best_of_n", "curve": "best_of_n", "setting": f"N={n}", "n": n, "reward": "model",
            "kl": 0.0, "kl_analytic": math.log(n) - (n - 1) / n, "gold_score": float(np.mean(gold)),
            "gold_per_prompt": gold}  # fmt: skip


def test_ppo_seeds_are_one_point_over_seeds_and_a_single_policy_one_over_prompts():
    seeds = [ppo("s0", [0.4, 0.6], 2.0), ppo("s1", [0.5, 0.7], 3.0), ppo("s2", [0.6, 0.8], 4.0)]
    averaged = {"method": "ppo_average", "setting": "eta=1", "reward": "model", "kl": 1.5, "kl_analytic": None,
                "gold_score": 0.6, "gold_per_prompt": [0.5, 0.6, 0.7], "members": ["s0", "s1", "s2"]}  # fmt: skip
    summary = {
        "methods": [{"method": "reference", "setting": "", "gold_score": 0.3}, *seeds, averaged, bon(16, [0.5, 0.6])]
    }
    points = {p["method"]: p for p in frontier.frontier_summary(summary)["points"]}
    over_seeds = points["ppo"]
    assert (over_seeds["seeds"], over_seeds["ci_over"], over_seeds["kl_mean"]) == (3, "seeds", 3.0)
    half = T2 * 0.1 / math.sqrt(3)  # seed means 0.5, 0.6, 0.7: std 0.1
    assert over_seeds["gold_mean"] == pytest.approx(0.6) and over_seeds["gold_ci"] == pytest.approx(
        [0.6 - half, 0.6 + half]
    )
    one = points["ppo_average"]
    assert (one["seeds"], one["ci_over"]) == (3, "prompts")  # three seeds' updates, one policy: CI over prompts
    assert one["gold_ci"] == pytest.approx([0.6 - T2 * 0.1 / math.sqrt(3), 0.6 + T2 * 0.1 / math.sqrt(3)])
    assert points["best_of_n"]["kl_mean"] == pytest.approx(math.log(16) - 15 / 16)  # best-of-N: the analytic KL


def test_the_best_trained_point_within_the_budget_is_paired_by_prompt_against_best_of_16():
    base = [0.5, 0.6, 0.4, 0.7]
    seeds = [ppo("s0", [0.6, 0.7, 0.5, 0.9], 3.0), ppo("s1", [0.5, 0.8, 0.6, 0.7], 5.0),
             ppo("s2", [0.7, 0.6, 0.5, 0.8], 4.0), ppo("s3", [0.6, 0.7, 0.6, 0.8], 4.0)]  # fmt: skip
    far = {"method": "rloo", "setting": "beta=0.01", "reward": "model", "kl": 9.0, "kl_analytic": None,
           "gold_score": 0.95, "gold_per_prompt": [0.95] * 4}  # fmt: skip
    best = frontier.frontier_summary({"methods": [*seeds, far, bon(16, base), bon(4, [0.5] * 4)]})
    best = best["best_trained_vs_bon16"]
    assert (best["method"], best["seeds"], best["kl"]) == ("ppo", 4, 4.0)  # the RLOO point at 9 nats is out
    per_seed = [np.mean(np.asarray(e["gold_per_prompt"]) - base) for e in seeds]  # paired by prompt, then over seeds
    mean, std = np.mean(per_seed), np.std(per_seed, ddof=1)
    assert best["diff_ci"] == pytest.approx([mean - T3 * std / 2, mean + T3 * std / 2])
    assert best["bon16_gold_same_reward"] == pytest.approx(0.55) and best["beats_bon16"] is bool(
        mean - T3 * std / 2 > 0
    )
    one = frontier.frontier_summary({"methods": [seeds[0], bon(16, base)]})["best_trained_vs_bon16"]
    d = np.asarray(seeds[0]["gold_per_prompt"]) - base  # one policy: over its prompts
    half = T3 * d.std(ddof=1) / 2
    assert one["diff_ci"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert frontier.frontier_summary({"methods": [far, bon(16, base)]})["best_trained_vs_bon16"] is None
    on_min = {**seeds[0], "reward": "min"}  # a policy that optimised the ensemble's min: judged against its best-of-16
    by_min = {**bon(16, [0.6, 0.7, 0.5, 0.9]), "curve": "best_of_n:min", "reward": "min"}
    same = frontier.frontier_summary({"methods": [on_min, bon(16, base), by_min]})["best_trained_vs_bon16"]
    assert same["bon16_gold_same_reward"] == pytest.approx(0.675) and same["bon16_gold_single"] == pytest.approx(0.55)
    assert same["diff_ci"] == pytest.approx([0.0, 0.0])  # paired with its own reward's best-of-16: equal per prompt


def test_reward_rows_give_each_models_accuracy_vs_gold_with_a_wilson_interval(tmp_path):
    from rlhf_lib.evaluate.stats import wilson_interval

    held = {"reward_model": {"eval_accuracy_vs_gold": 0.7, "n_eval_pairs": 103, "n_eval_pairs_gold_tied": 3}}
    (row,) = frontier.reward_rows("seed0", held, tmp_path)
    assert (row["name"], row["kind"], row["members"], row["accuracy_vs_gold"]) == ("seed0:model", "single", 1, 0.7)
    assert row["accuracy_vs_gold_ci"] == pytest.approx(list(wilson_interval(70, 100)), abs=1e-4)
    acc = {"accuracy_vs_gold": 0.75, "ci": [0.7, 0.8]}
    member = [{"accuracy_vs_gold": 0.6 + 0.01 * i, "ci": [0.5, 0.7]} for i in range(2)]
    write_json_atomic(tmp_path / "ensemble.json", {"members": 2, "member": member, "warm": acc, "mean": acc,
                                                   "min": acc, "uwo": acc})  # fmt: skip
    rows = frontier.reward_rows("seed0", held, tmp_path)
    assert [(r["name"], r["kind"], r["members"]) for r in rows] == [
        ("seed0:model", "warm", 2), ("seed0:mean", "mean", 2), ("seed0:min", "min", 2), ("seed0:uwo", "uwo", 2),
        ("seed0:member0", "single", 1), ("seed0:member1", "single", 1),
    ]  # fmt: skip
    assert json.loads(json.dumps(rows))[1]["accuracy_vs_gold_ci"] == [0.7, 0.8]
    assert [r["accuracy_vs_gold"] for r in rows[4:]] == [0.6, 0.61]
    table = frontier.rewards_markdown({"rewards": rows + [{**rows[0], "name": "x", "accuracy_vs_gold": None}]})
    lines = table.splitlines()
    assert lines[2] == "| seed0:model | warm | 2 | 0.750 | [0.700, 0.800] |" and lines[-1] == "| x | warm | 2 | – | – |"
    assert lines[-2] == "| seed0:member1 | single | 1 | 0.610 | [0.500, 0.700] |" and len(lines) == 2 + 7


def test_tables_show_each_point_the_verdict_and_where_the_best_of_n_fit_peaks():
    base = [0.5, 0.6, 0.4, 0.7]
    seeds = [ppo("s0", [0.6, 0.7, 0.5, 0.9], 3.0), ppo("s1", [0.5, 0.8, 0.6, 0.7], 5.0)]
    bons = [bon(n, [0.45 + 0.02 * math.log2(n)] * 4) for n in (1, 2, 4, 8)] + [bon(16, base)]
    summary = frontier.frontier_summary({"methods": [*seeds, *bons], "best_of_n_fit": {
        "best_of_n": {"alpha": 0.2, "beta": 0.05, "r2": 0.9, "kl_at_peak": 4.0, "gain_at_peak": 0.2},
        "best_of_n_oracle": {"alpha": None}}})  # fmt: skip
    rows = frontier.points_markdown(summary).splitlines()
    assert rows[0].startswith("| method | reward | setting | seeds |") and len(rows) == 2 + 6
    assert "| ppo | model | final | 2 | 4.00 | 0.662 |" in "\n".join(rows)
    best = frontier.best_markdown(summary).splitlines()[2]
    assert best.startswith("| ppo final (model) | 2 | 4.00 | 0.662 | 0.550 | [") and best.endswith(" |")
    fit = frontier.fit_markdown(summary).splitlines()
    assert len(fit) == 3  # the oracle's empty fit is left out
    n_at_peak = float(fit[2].split(" | ")[5].replace(",", ""))
    assert math.log(n_at_peak) - (n_at_peak - 1) / n_at_peak == pytest.approx(
        4.0, abs=0.01
    )  # the N whose KL is 4 (N shown whole)
    assert (
        frontier.best_markdown({"kl_budget": 6.0, "best_trained_vs_bon16": None}) == "No trained point within 6 nats."
    )
