"""Best-of-N from the reference policy, ranked by the reward model: inference-time, no training.

For each held-out prompt, M reference samples are drawn once (M >= the largest N) and scored by the reward model and
the gold scorer. Best-of-N is then evaluated *exactly over that pool* with the unbiased estimator over subsets: the
expected gold of the RM-argmax of a uniformly random N-subset. With the pool sorted by RM score (ascending, rank
i = 1..M, ties broken by pool order), the sample of rank i is the argmax of a random N-subset with probability
C(i-1, N-1) / C(M, N), so every statistic is a weighted mean of the pool. Oracle best-of-N ranks by gold instead.

Ranked by another reward: ``best_of_n.rewards`` lists the rewards the pool is also ranked by (the ensemble's
``mean`` / ``min`` / ``uwo``, :mod:`rlhf_lib.reward.combined`), so best-of-N stands beside a policy trained on the same
reward. Gao et al. (2022)'s best-of-N form gold_gain(d) = d (alpha - beta d), d = sqrt(KL), is fitted per curve
(:func:`fit_best_of_n`): its peak says how far reward-ranked gold would still rise with more samples.

KL of best-of-N to the reference: the analytic log N - (N-1)/N (Stiennon et al. 2020, App. G; Gao et al. 2022).
It is an upper bound, reached when rewards are distinct and no single response carries much probability (Beirami
et al. 2024, "Theoretical guarantees on the best-of-n alignment policy"). Beside it, the measured value: the exact
best-of-N KL of the pool's empirical distribution (:func:`best_of_n_kl`, equal RM scores as one tie class), which
shows where ties (repeated responses) pull the true KL below the formula.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhf_lib.evaluate import sampling as eval_sampling
from rlhf_lib.evaluate import stats as eval_stats
from rlhf_lib.evaluate.sampling import GenerationSettings, Samples
from rlhf_lib.reward.combined import REWARDS

METHOD = "best_of_n"
ORACLE = "best_of_n_oracle"


@dataclass
class BestOfNConfig:
    """Best-of-N sampling from the reference policy, ranked by the reward model (and by gold: the oracle)."""

    enabled: bool = True  # evaluate best-of-N at all
    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # N values (each <= n_samples)
    n_samples: int = 32  # M: reference samples per eval prompt, drawn once; every N is estimated exactly over them
    oracle: bool = True  # also oracle best-of-N (ranked by the gold score): the ceiling of reranking
    rewards: list[str] = field(default_factory=lambda: ["model"])  # rank by: model (saved RM; WARM), mean, min, uwo

    def check(self) -> None:
        unknown = [r for r in self.rewards if r not in REWARDS]
        if unknown or not self.rewards or len(set(self.rewards)) != len(self.rewards):
            raise ValueError(
                f"best_of_n.rewards={self.rewards}: list each of {', '.join(REWARDS)} at most once, at least one"
            )
        if self.n_samples < 1:
            raise ValueError(f"best_of_n.n_samples={self.n_samples} must be >= 1")
        bad = [n for n in self.ns if n < 1 or n > self.n_samples]
        if bad:
            raise ValueError(
                f"best_of_n.ns has {bad}: every N must lie in 1..n_samples={self.n_samples}; "
                "raise n_samples or drop those N"
            )


# ----------------------------------------------------------------------------------------------------------------
# pure maths


def analytic_kl(n: int) -> float:
    """KL(best-of-n || reference) = log n - (n - 1) / n nats (Stiennon et al. 2020), an upper bound."""
    return math.log(n) - (n - 1) / n


def fit_best_of_n(kl: Sequence[float], gain: Sequence[float]) -> dict[str, Any]:
    """Least-squares fit of Gao et al. (2022)'s best-of-N form gain(d) = d (alpha - beta d), d = sqrt(KL).

    Linear in (alpha, beta), so closed form. When beta > 0 the fitted gain peaks at d* = alpha / (2 beta), where it is
    alpha^2 / (4 beta); KL <= 0 points (N = 1) are the reference and carry no information about the shape.
    """
    kl_arr, y = np.asarray(kl, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    keep = np.isfinite(kl_arr) & np.isfinite(y) & (kl_arr > 0)
    d, y = np.sqrt(kl_arr[keep]), y[keep]
    out: dict[str, Any] = {
        "alpha": None,
        "beta": None,
        "r2": None,
        "kl_at_peak": None,
        "gain_at_peak": None,
        "n_points": int(d.size),
        "form": "gold_gain(d) = d (alpha - beta d), d = sqrt(KL)",
    }
    if d.size < 2 or np.ptp(d) == 0:
        return out
    design = np.stack([d, -(d**2)], axis=1)  # (n, 2)
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ np.array([alpha, beta])
    ss_tot = float(((y - y.mean()) ** 2).sum())
    out.update(alpha=float(alpha), beta=float(beta), r2=1 - float((resid**2).sum()) / ss_tot if ss_tot else None)
    if beta > 0 and alpha > 0:
        d_star = float(alpha) / (2 * float(beta))
        out.update(kl_at_peak=d_star**2, gain_at_peak=float(alpha) ** 2 / (4 * float(beta)))
    return out


def best_of_n_fits(entries: Sequence[dict[str, Any]], reference_gold: float | None) -> dict[str, dict[str, Any]]:
    """Per best-of-N curve (reward-ranked, oracle): :func:`fit_best_of_n` over (analytic KL, gold - reference)."""
    if reference_gold is None:
        return {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        if e.get("method") in (METHOD, ORACLE) and e.get("gold_score") is not None:
            curves.setdefault(e.get("curve") or e["method"], []).append(
                (e["kl_analytic"], e["gold_score"] - reference_gold)
            )
    return {name: fit_best_of_n(*zip(*pts)) for name, pts in curves.items()}


def curve_name(oracle: bool, reward: str = "model") -> str:
    """best_of_n (ranked by the saved reward model), best_of_n:<reward> (by an ensemble combination), or the oracle."""
    if oracle:
        return ORACLE
    return METHOD if reward == "model" else f"{METHOD}:{reward}"


def selection_weights(scores: Sequence[float], n: int) -> np.ndarray:
    """(M,) probability that each sample is the argmax by `scores` of a uniformly random n-subset of the M samples.

    Ties are broken by position (the later sample wins), the same rule as ``max(subset, key=(score, index))``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.size
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs 1 <= n <= {m} samples")
    order = np.lexsort((np.arange(m), scores))  # ascending by score, then by position
    total = math.comb(m, n)
    by_rank = np.array([math.comb(i - 1, n - 1) / total for i in range(1, m + 1)])  # rank i = 1..m
    weights = np.empty(m)
    weights[order] = by_rank
    return weights


def best_of_n_distribution(probs: Sequence[float], rewards: Sequence[float], n: int) -> np.ndarray:
    """Exact best-of-n distribution over a categorical's outcomes (equal rewards: ties broken uniformly at random).

    With F(r) = P(reward <= r) and F_(r) = P(reward < r), the best of n draws has reward r with probability
    F(r)^n - F_(r)^n, shared among the outcomes of that reward in proportion to their probability.
    """
    p = np.asarray(probs, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    values, inverse = np.unique(r, return_inverse=True)  # tie classes, ascending reward
    mass = np.bincount(inverse, weights=p, minlength=values.size)  # P(reward = value)
    upper = np.cumsum(mass)  # F(value)
    share = upper**n - (upper - mass) ** n  # P(best of n has reward = value)
    safe = np.where(mass > 0, mass, 1.0)
    return np.where(mass[inverse] > 0, p / safe[inverse] * share[inverse], 0.0)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two distributions over the same outcomes (0 log 0 = 0)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def best_of_n_kl(probs: Sequence[float], rewards: Sequence[float], n: int) -> float:
    """Exact KL(best-of-n || reference) of a categorical reference with the given rewards."""
    return kl_divergence(best_of_n_distribution(probs, rewards, n), probs)


def pool_kl(scores: Sequence[float], n: int) -> float:
    """Measured KL of best-of-n for one prompt: exact over the pool's empirical distribution (1/M per sample)."""
    scores = np.asarray(scores, dtype=np.float64)
    return best_of_n_kl(np.full(scores.size, 1.0 / scores.size), scores, n)


# ----------------------------------------------------------------------------------------------------------------
# the pool of reference samples


@dataclass
class Pool:
    """M reference samples per prompt, scored. Arrays are (P, M); texts[p][k] is prompt p's k-th sample."""

    rm: np.ndarray
    gold: np.ndarray | None
    lengths: np.ndarray
    eos: np.ndarray
    texts: list[list[str]]
    sample_seconds: float = 0.0
    # (P, M) scores of each other reward the pool is ranked by (``best_of_n.rewards`` but "model"), by name
    rewards: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return self.rm.shape[0]


def sample_pool(
    reference,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    n_samples: int,
    rm_scorer,
    gold_scorer,
    reward_scorers: dict[str, Any] | None = None,
) -> Pool:
    """Draw n_samples reference responses per prompt with seeds settings.seed + 1 ... + n_samples (seed itself is
    the reference sample every method's win rate is judged against, so the pool is independent of it), each scored
    by the reward model, gold, and every scorer of ``reward_scorers`` (name -> scorer of token-id sequences)."""
    import time

    start = time.perf_counter()
    draws: list[Samples] = []
    scores: list[tuple[np.ndarray, np.ndarray | None]] = []
    others: dict[str, list[np.ndarray]] = {name: [] for name in reward_scorers or {}}
    for k in range(n_samples):
        s = dataclasses.replace(settings, seed=settings.seed + 1 + k)
        draws.append(eval_sampling.sample_policy(reference, tokenizer, prompt_ids, s, desc=f"best-of-N pool {k + 1}"))
        scores.append(eval_sampling.score_samples(draws[-1], rm_scorer, gold_scorer))
        for name, scorer in (reward_scorers or {}).items():
            others[name].append(np.asarray(scorer(draws[-1].sequences), dtype=np.float64))
    rm = np.stack([r for r, _ in scores], axis=1)  # (P, M)
    gold = None if gold_scorer is None else np.stack([g for _, g in scores], axis=1)
    return Pool(
        rm=rm,
        gold=gold,
        lengths=np.stack([d.lengths for d in draws], axis=1).astype(np.float64),
        eos=np.stack([d.contains_eos for d in draws], axis=1).astype(np.float64),
        texts=[[d.texts[p] for d in draws] for p in range(rm.shape[0])],
        sample_seconds=time.perf_counter() - start,
        rewards={name: np.stack(v, axis=1) for name, v in others.items()},  # (P, M) each
    )


def ranking(pool: Pool, oracle: bool, reward: str = "model") -> np.ndarray:
    """(P, M) the scores best-of-N ranks the pool by: gold (oracle), the reward model, or another reward."""
    if oracle:
        return pool.gold
    if reward == "model":
        return pool.rm
    if reward not in pool.rewards:
        raise ValueError(f"the best-of-N pool was not scored by reward {reward!r}; it has {sorted(pool.rewards)}")
    return pool.rewards[reward]


def pool_entry(
    pool: Pool,
    n: int,
    judged_reference: np.ndarray,
    judge: str,
    oracle: bool = False,
    reward: str = "model",
    tie_tolerance: float = 0.0,
    ci_method: str = "wilson",
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """One comparison entry (summary keys) for best-of-n over the pool, ranked by gold (oracle) or by ``reward``;
    per-prompt values are exact expectations. ``rm_score`` is always the saved reward model's (comparable across
    methods); ``reward_score`` is the ranking reward's own."""
    if oracle and pool.gold is None:
        raise ValueError("oracle best-of-N ranks by gold, but this run has no gold scorer; set best_of_n.oracle: false")
    ranked = ranking(pool, oracle, reward)  # (P, M)
    w = np.stack([selection_weights(row, n) for row in ranked])  # (P, M)
    judged = pool.gold if judge == "gold" else pool.rm
    # expected outcome vs the reference sample of the same prompt: win 1, tie 0.5, loss 0
    diff = judged - np.asarray(judged_reference, dtype=np.float64)[:, None]  # (P, M)
    outcome = np.where(np.abs(diff) <= tie_tolerance, 0.5, np.where(diff > 0, 1.0, 0.0))
    per_prompt = {"rm": (w * pool.rm).sum(1), "outcome": (w * outcome).sum(1)}
    if pool.gold is not None:
        per_prompt["gold"] = (w * pool.gold).sum(1)
    n_prompts = pool.n_prompts
    rate = float(per_prompt["outcome"].mean())
    if ci_method == "bootstrap":
        ci = eval_stats.bootstrap_interval(per_prompt["outcome"], n_bootstrap=n_bootstrap, seed=seed)
    else:
        ci = eval_stats.wilson_interval(float(per_prompt["outcome"].sum()), n_prompts)
    mean_length = float((w * pool.lengths).sum(1).mean())
    return {
        "method": ORACLE if oracle else METHOD,
        "curve": curve_name(oracle, reward),
        "reward": "gold" if oracle else reward,
        "setting": f"N={n}",
        "n": n,
        "kl": float(np.mean([pool_kl(row, n) for row in ranked])),
        "kl_analytic": analytic_kl(n),
        "gold_score": float(per_prompt["gold"].mean()) if "gold" in per_prompt else None,
        "gold_score_se": _se(per_prompt["gold"]) if "gold" in per_prompt else None,
        "rm_score": float(per_prompt["rm"].mean()),
        "rm_score_se": _se(per_prompt["rm"]),
        "reward_score": float((w * ranked).sum(1).mean()),
        "win_rate_vs_ref": rate,
        "win_rate_ci": [float(ci[0]), float(ci[1])],
        "length": mean_length,
        "eos_fraction": float((w * pool.eos).sum(1).mean()),
        "train_seconds": 0.0,
        # what best-of-N costs at inference: N responses per prompt (each also scored by the ranker)
        "generated_tokens": int(round(n * float(pool.lengths.mean()) * n_prompts)),
        "n_prompts": n_prompts,
        "n_pool": int(pool.rm.shape[1]),
        # per prompt, the exact expectation over the pool: what paired differences are computed from
        "gold_per_prompt": [round(float(g), 6) for g in per_prompt["gold"]] if "gold" in per_prompt else None,
    }


def _se(values: np.ndarray) -> float:
    """Standard error of the mean over prompts (ddof=1; 0 for one prompt)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0


def best_of_n_entries(
    cfg: BestOfNConfig, pool: Pool, judged_reference: np.ndarray, judge: str, **win_kwargs: Any
) -> list[dict[str, Any]]:
    """Entries for every reward of cfg.rewards and every N (reward-ranked), then every N oracle-ranked when
    cfg.oracle and gold exists."""
    out = [pool_entry(pool, n, judged_reference, judge, reward=r, **win_kwargs) for r in cfg.rewards for n in cfg.ns]
    if cfg.oracle and pool.gold is not None:
        out += [pool_entry(pool, n, judged_reference, judge, oracle=True, **win_kwargs) for n in cfg.ns]
    return out


def chosen_texts(pool: Pool, n: int, rows: int, reward: str = "model") -> list[str]:
    """For the sample table: the argmax by ``reward`` of the first n pool samples of each of the first `rows`
    prompts."""
    ranked = ranking(pool, False, reward)
    return [pool.texts[p][max(range(n), key=lambda k: (ranked[p, k], k))] for p in range(min(rows, pool.n_prompts))]
