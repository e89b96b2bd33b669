"""The numbers of a reward model on held-out pairs, pure and tested on hand-made inputs: pairwise accuracy (ties
wrong), Bradley–Terry loss, calibration table and ECE, accuracy by preference strength, the length-only baseline, the
per-pair table they are computed from, and the degenerate-rewards check.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd


class DegenerateRewardsError(RuntimeError):
    """The reward model's outputs are NaN/inf or (nearly) constant: it cannot rank anything."""


def pairwise_accuracy(reward_chosen: np.ndarray, reward_rejected: np.ndarray) -> float:
    """Fraction of pairs with reward_chosen > reward_rejected; a tie counts as wrong."""
    reward_chosen, reward_rejected = np.asarray(reward_chosen, float), np.asarray(reward_rejected, float)
    return float(np.mean(reward_chosen > reward_rejected)) if len(reward_chosen) else float("nan")


def check_rewards(rewards: np.ndarray, min_std: float, where: str) -> None:
    """Raise DegenerateRewardsError on NaN/inf rewards or a (nearly) constant reward model."""
    rewards = np.asarray(rewards, float)
    bad = int(np.sum(~np.isfinite(rewards)))
    if bad:
        raise DegenerateRewardsError(
            f"{where}: {bad} of {rewards.size} rewards are NaN/inf; the reward model is "
            "broken (diverged training?). Lower learning_rate/head_learning_rate and retrain."
        )
    std = float(np.std(rewards))
    if std < min_std:
        raise DegenerateRewardsError(
            f"{where}: rewards are (nearly) constant (std {std:.3g} < min_reward_std {min_std:g}, mean "
            f"{float(np.mean(rewards)):.4g}); the reward model did not learn and would give PPO no signal. "
            "Check that training ran (loss below ln 2 = 0.693), raise head_learning_rate or num_train_epochs."
        )


def bt_loss(gap: np.ndarray) -> float:
    """Mean Bradley–Terry loss -log sigmoid(r_chosen - r_rejected) (numerically stable)."""
    return float(np.mean(np.logaddexp(0.0, -np.asarray(gap, float))))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, float)))


def calibration_table(gap: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Predicted P(first preferred) = sigmoid(gap) vs observed frequency, binned.

    Every pair is counted in both orders ((chosen, rejected) with outcome 1, (rejected, chosen) with outcome 0);
    otherwise the observed frequency would be 1 in every bin. A calibrated RM lies on the diagonal.
    """
    gap = np.asarray(gap, float)
    p = np.concatenate([_sigmoid(gap), _sigmoid(-gap)])
    outcome = np.concatenate([np.ones_like(gap), np.zeros_like(gap)])
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = which == b
        rows.append(
            {
                "bin_low": edges[b],
                "bin_high": edges[b + 1],
                "n": int(sel.sum()),
                "mean_predicted": float(p[sel].mean()) if sel.any() else float("nan"),
                "observed": float(outcome[sel].mean()) if sel.any() else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(table: pd.DataFrame) -> float:
    """Count-weighted mean |predicted - observed| over non-empty calibration bins."""
    t = table[table["n"] > 0]
    return float(np.sum(t["n"] * (t["mean_predicted"] - t["observed"]).abs()) / max(int(t["n"].sum()), 1))


def strength_table(pairs: pd.DataFrame, bins: int = 4) -> pd.DataFrame:
    """Accuracy by preference strength (quantile bins of pairs['strength']); empty when no strength is known."""
    if "strength" not in pairs or pairs["strength"].isna().all():
        return pd.DataFrame(columns=["bin", "low", "high", "n", "accuracy", "accuracy_vs_gold"])
    data = pairs.dropna(subset=["strength"])
    codes = pd.qcut(data["strength"].rank(method="first"), q=min(bins, len(data)), labels=False)
    rows = []
    for b, group in data.groupby(codes):
        vs_gold = group["correct_vs_gold"].dropna() if "correct_vs_gold" in group else pd.Series(dtype=float)
        rows.append(
            {
                "bin": int(b),
                "low": float(group["strength"].min()),
                "high": float(group["strength"].max()),
                "n": len(group),
                "accuracy": float(group["correct"].mean()),
                "accuracy_vs_gold": float(vs_gold.mean()) if len(vs_gold) else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def length_predictions(train_rows: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, str]:
    """The length-only predictor: +1 = predicts chosen, -1 = predicts rejected, 0 = equal lengths (no prediction).

    Its direction (longer or shorter wins) is fitted on the training labels, so it sees no held-out label.
    """

    def sign(rs):
        return np.array([np.sign(len(r["chosen_ids"]) - len(r["rejected_ids"])) for r in rs], dtype=float)

    train = sign(train_rows)
    direction = 1.0 if np.sum(train > 0) >= np.sum(train < 0) else -1.0
    return sign(rows) * direction, "longer" if direction > 0 else "shorter"


def baseline_accuracy(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Accuracy of +1/-1/0 predictions against +1/-1 truths (truth 0 or NaN = skipped); a 0 prediction counts 1/2."""
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    keep = np.isfinite(truth) & (truth != 0)
    if not keep.any():
        return None
    pred, truth = pred[keep], truth[keep]
    return float(np.mean(np.where(pred == 0, 0.5, (pred == truth).astype(float))))


def _num(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if value is not None else float("nan")


def pairs_frame(
    rows: Sequence[dict[str, Any]], reward_chosen: np.ndarray, reward_rejected: np.ndarray, eos_id: int | None
) -> pd.DataFrame:
    """One row per held-out pair: rewards, gap, correctness (ties wrong), lengths, finish flags, gold/score gaps."""
    df = pd.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "reward_chosen": reward_chosen,
            "reward_rejected": reward_rejected,
            "len_chosen": [len(r["chosen_ids"]) for r in rows],
            "len_rejected": [len(r["rejected_ids"]) for r in rows],
            "finished_chosen": [r["chosen_ids"][-1] == eos_id for r in rows],
            "finished_rejected": [r["rejected_ids"][-1] == eos_id for r in rows],
            "gold_chosen": [_num(r, "gold_chosen") for r in rows],
            "gold_rejected": [_num(r, "gold_rejected") for r in rows],
            "score_chosen": [_num(r, "score_chosen") for r in rows],
            "score_rejected": [_num(r, "score_rejected") for r in rows],
        }
    )
    df["gap"] = df["reward_chosen"] - df["reward_rejected"]
    df["p_chosen"] = _sigmoid(df["gap"].to_numpy())
    df["tie"] = df["gap"] == 0
    df["correct"] = df["gap"] > 0  # ties count as wrong
    df["gold_gap"] = df["gold_chosen"] - df["gold_rejected"]
    df["score_gap"] = df["score_chosen"] - df["score_rejected"]
    gold_known = df["gold_gap"].notna() & (df["gold_gap"] != 0)  # gold ties have no right answer: left out
    df["correct_vs_gold"] = np.where(gold_known, np.sign(df["gap"]) == np.sign(df["gold_gap"]), np.nan)
    if df["gold_gap"].notna().any():
        df["strength"], df.attrs["strength_by"] = df["gold_gap"].abs(), "|gold_chosen - gold_rejected|"
    elif df["score_gap"].notna().any():
        df["strength"], df.attrs["strength_by"] = df["score_gap"], "score_chosen - score_rejected"
    else:
        df["strength"], df.attrs["strength_by"] = np.nan, None
    return df
