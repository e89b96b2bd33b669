"""The frontier summary: what a comparison says about beating best-of-16 within the KL budget.

From one comparison's summary.json (and the reward-model folders of the runs it read) :func:`frontier_summary` builds
``docs/frontier/summary.json``:

- ``rewards``: each reward a point optimised or ranked by, ``{name, kind, members, accuracy_vs_gold,
  accuracy_vs_gold_ci}`` (kind: single, warm, mean, min, uwo; the interval is Wilson's over held-out pairs), and an
  ensemble's members one by one (kind single, name ``<run>:member<i>``);
- ``points``: ``{method, reward, setting, seeds, kl_mean, gold_mean, gold_ci, ci_over}``. The PPO runs' final
  policies of one setting are one point over seeds (Student-t interval over seeds); a single policy or best-of-N is
  one point with the interval over prompts (mean +- t s.e.);
- ``best_trained_vs_bon16``: the trained point of highest gold at KL <= ``KL_BUDGET`` against best-of-16 ranked by
  the reward it optimised (``best_of_n:<reward>`` when the comparison ranked by it, else the saved reward model, which
  is also ``bon16_gold_single``), ``diff_ci`` the 95 % interval of the gold difference *paired by prompt* (per seed,
  then over seeds for a point over seeds; over prompts for one policy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_lib.compare import best_of_n as bon
from rlhf_lib.core.runs import read_json
from rlhf_lib.evaluate.stats import wilson_interval

KL_BUDGET = 6.0  # nats: the budget the trained point must stay within
TRAINED = ("ppo", "ppo_average", "dpo", "rloo", "grpo")
BON_N = 16


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, list[float] | None]:
    """(mean, [low, high]) of the Student-t interval of the mean; None below two values."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return mean, None
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, [mean - half, mean + half]


def reward_rows(name: str, run_summary: dict[str, Any], reward_model_dir: Path) -> list[dict[str, Any]]:
    """The rewards one run's reward model offers: the saved model (single, or WARM for an ensemble) and, for an
    ensemble, its combinations and then each member, each with its accuracy vs gold on the held-out pairs.
    ``run_summary``: the run's summary.json (its ``reward_model`` block holds a single model's held-out numbers)."""
    report = read_json(Path(reward_model_dir) / "ensemble.json", None)
    if report and "member" in report:
        rows = [_reward(f"{name}:model", "warm", report["members"], report["warm"])]
        rows += [_reward(f"{name}:{how}", how, report["members"], report[how]) for how in ("mean", "min", "uwo")]
        return rows + [_reward(f"{name}:member{i}", "single", 1, acc) for i, acc in enumerate(report["member"])]
    held = run_summary.get("reward_model") or {}
    acc = held.get("eval_accuracy_vs_gold")
    n = int(held.get("n_eval_pairs", 0)) - int(held.get("n_eval_pairs_gold_tied", 0))
    ci = [round(x, 4) for x in wilson_interval(acc * n, n)] if acc is not None and n > 0 else None
    return [
        {"name": f"{name}:model", "kind": "single", "members": 1, "accuracy_vs_gold": acc, "accuracy_vs_gold_ci": ci}
    ]


def _reward(name: str, kind: str, members: int, acc: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "members": members,
        "accuracy_vs_gold": acc["accuracy_vs_gold"],
        "accuracy_vs_gold_ci": acc["ci"],
    }


def _kl(entry: dict[str, Any]) -> float:
    return entry["kl_analytic"] if entry.get("kl_analytic") is not None else entry["kl"]


def point_groups(methods: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Entries by (method, reward, setting): the PPO curves' final policies (one per run) form one group, every
    other entry is a group of its own."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in methods:
        if e["method"] == "reference" or e.get("gold_score") is None:
            continue
        reward = "gold" if e["method"] == bon.ORACLE else str(e.get("reward") or "pairs")  # DPO: the pairs
        method = (e.get("curve") or e["method"]) if e["method"] == bon.METHOD else e["method"]  # best_of_n:<reward>
        groups.setdefault((method, reward, e["setting"]), []).append(e)
    return groups


def point(key: tuple[str, str, str], entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One frontier point: over seeds when it holds several runs' policies, over prompts otherwise."""
    method, reward, setting = key
    if len(entries) > 1:
        gold_mean, gold_ci = t_interval([e["gold_score"] for e in entries])
        kl_mean, over, seeds = float(np.mean([_kl(e) for e in entries])), "seeds", len(entries)
    else:
        (e,) = entries
        per_prompt = e.get("gold_per_prompt")
        gold_mean, gold_ci = t_interval(per_prompt) if per_prompt else (e["gold_score"], None)
        kl_mean, over, seeds = _kl(e), "prompts", len(e.get("members") or [e])
    return {
        "method": method,
        "reward": reward,
        "setting": setting,
        "seeds": seeds,
        "kl_mean": kl_mean,
        "gold_mean": gold_mean,
        "gold_ci": gold_ci,
        "ci_over": over,
        "runs": [e.get("run") or e.get("curve") for e in entries],
    }


def paired_difference(entries: Sequence[dict[str, Any]], baseline: Sequence[float]) -> list[float] | None:
    """95 % interval of mean gold(point) - gold(baseline) paired by prompt: per policy the mean of its per-prompt
    differences, then a t interval over policies; one policy: the t interval over its prompts."""
    base = np.asarray(baseline, dtype=np.float64)
    diffs = []
    for e in entries:
        per_prompt = e.get("gold_per_prompt")
        if per_prompt is None or len(per_prompt) != base.size:
            return None
        diffs.append(np.asarray(per_prompt, dtype=np.float64) - base)
    if len(diffs) > 1:
        return t_interval([d.mean() for d in diffs])[1]
    return t_interval(diffs[0])[1]


def frontier_summary(compare_summary: dict[str, Any], rewards: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The frontier summary of a comparison (module docstring); ``rewards`` from :func:`reward_rows`."""
    methods = compare_summary["methods"]
    groups = point_groups(methods)
    points = [point(k, v) for k, v in groups.items()]
    bon16 = {e.get("curve", e["method"]): e for e in methods if e["method"] == bon.METHOD and e.get("n") == BON_N}
    trained = [
        (p, groups[(p["method"], p["reward"], p["setting"])])
        for p in points
        if p["method"] in TRAINED and p["kl_mean"] is not None and p["kl_mean"] <= KL_BUDGET
    ]
    best = None
    if trained:
        p, entries = max(trained, key=lambda item: item[0]["gold_mean"])
        single = bon16.get(bon.METHOD)  # ranked by the saved reward model
        same = bon16.get(bon.curve_name(False, p["reward"])) or single  # by the reward the point optimised
        best = {
            "method": p["method"],
            "reward": p["reward"],
            "setting": p["setting"],
            "seeds": p["seeds"],
            "kl": p["kl_mean"],
            "gold": p["gold_mean"],
            "bon16_gold_same_reward": same["gold_score"] if same else None,
            "bon16_gold_single": single["gold_score"] if single else None,
            "diff_ci": paired_difference(entries, same["gold_per_prompt"]) if same else None,
            "beats_bon16": None,
        }
        if best["diff_ci"] is not None:
            best["beats_bon16"] = bool(best["diff_ci"][0] > 0)
    return {
        "source": {"base_run": compare_summary.get("base_run"), "profile": compare_summary.get("profile")},
        "git": compare_summary.get("git"),
        "n_eval_prompts": compare_summary.get("n_eval_prompts"),
        "kl_budget": KL_BUDGET,
        "rewards": list(rewards),
        "points": points,
        "best_trained_vs_bon16": best,
        "best_of_n_fit": compare_summary.get("best_of_n_fit", {}),
    }


# ----------------------------------------------------------------------------------------------------------------
# generated tables (docs)


def _ci(values: Sequence[float] | None, digits: int = 3) -> str:
    return f"[{values[0]:.{digits}f}, {values[1]:.{digits}f}]" if values else "–"


def rewards_markdown(summary: dict[str, Any], digits: int = 3) -> str:
    """Each reward's accuracy vs gold on the held-out pairs with its 95 % (Wilson) interval."""
    lines = ["| reward | kind | members | accuracy vs gold | 95 % CI |", "|---|---|---|---|---|"]
    for r in summary["rewards"]:
        acc = r["accuracy_vs_gold"]
        cells = f"{acc:.{digits}f} | {_ci(r['accuracy_vs_gold_ci'], digits)}" if acc is not None else "– | –"
        lines.append(f"| {r['name']} | {r['kind']} | {r['members']} | {cells} |")
    return "\n".join(lines)


def points_markdown(summary: dict[str, Any], digits: int = 3) -> str:
    """Every frontier point by KL: method, reward, setting, seeds, KL, gold with its 95 % interval (and over what)."""
    lines = [
        "| method | reward | setting | seeds | KL (nats) | gold | 95 % CI | CI over |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(summary["points"], key=lambda p: (p["method"], p["kl_mean"])):
        lines.append(
            f"| {p['method']} | {p['reward']} | {p['setting']} | {p['seeds']} | {p['kl_mean']:.2f} | "
            f"{p['gold_mean']:.{digits}f} | {_ci(p['gold_ci'], digits)} | {p['ci_over']} |"
        )
    return "\n".join(lines)


def best_markdown(summary: dict[str, Any], digits: int = 3) -> str:
    """The best trained point within the budget against best-of-16 (paired difference and its 95 % interval)."""
    b = summary.get("best_trained_vs_bon16")
    if not b:
        return f"No trained point within {summary['kl_budget']:g} nats."
    verdict = "yes" if b["beats_bon16"] else "no"
    return "\n".join(
        [
            f"| best trained point at KL ≤ {summary['kl_budget']:g} | seeds | KL | gold | best-of-16 gold (same "
            "reward) | gold difference, 95 % CI (paired by prompt) | above best-of-16? |",
            "|---|---|---|---|---|---|---|",
            f"| {b['method']} {b['setting']} ({b['reward']}) | {b['seeds']} | {b['kl']:.2f} | {b['gold']:.{digits}f} "
            f"| {b['bon16_gold_same_reward']:.{digits}f} | {_ci(b['diff_ci'], digits)} | {verdict} |",
        ]
    )


def fit_markdown(summary: dict[str, Any], digits: int = 3) -> str:
    """Gao et al.'s best-of-N fit per best-of-N curve: coefficients, R², and where the fitted gold gain peaks."""
    lines = [
        "| best-of-N curve | alpha | beta | R² | KL at the fitted peak (nats) | N there | gold gain at the peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, fit in summary.get("best_of_n_fit", {}).items():
        if fit.get("alpha") is None:
            continue
        peak = fit.get("kl_at_peak")
        n_at = f"{_n_for_kl(peak):,.0f}" if peak is not None else "–"
        lines.append(
            f"| {name} | {fit['alpha']:.{digits}f} | {fit['beta']:.{digits}f} | {fit['r2']:.3f} | "
            + (f"{peak:.2f} | {n_at} | {fit['gain_at_peak']:.{digits}f} |" if peak is not None else "– | – | – |")
        )
    return "\n".join(lines)


def _n_for_kl(kl: float) -> float:
    """The N whose analytic best-of-N KL log N - (N-1)/N is ``kl`` (bisection on log N; monotone for N >= 1)."""
    lo, hi = 0.0, 60.0
    for _ in range(200):
        mid = (lo + hi) / 2
        n = math.exp(mid)
        lo, hi = (mid, hi) if math.log(n) - (n - 1) / n < kl else (lo, mid)
    return math.exp(lo)
