"""Statistics of the evaluation, pure and tested on hand-made inputs: the per-sequence KL estimate, mean and standard
deviation, and the paired win rate (ties as half) with a Wilson or percentile-bootstrap interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from rlhf_lib.core.intervals import wilson_interval

__all__ = ["bootstrap_interval", "mean_std", "sequence_kl", "wilson_interval", "win_rate"]


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """(B,) per-sequence KL(policy || ref) estimate: sum over valid tokens of logp - logp_ref (k1, Schulman 2020)."""
    mask = mask.bool()  # (B, T)
    diff = torch.where(mask, logprobs.float() - ref_logprobs.float(), 0.0)  # (B, T); padding never leaks
    return diff.sum(dim=1)  # (B,)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value; nan for none)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def bootstrap_interval(
    outcomes: np.ndarray, confidence: float = 0.95, n_bootstrap: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss)."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    if outcomes.size == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, outcomes.size, size=(n_bootstrap, outcomes.size))  # prompts resampled, pairs kept
    means = outcomes[idx].mean(axis=1)
    alpha = 1 - confidence
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


@dataclass
class WinRate:
    """Win rate of A over B on paired scores; rate counts ties as half."""

    rate: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    n: int
    method: str

    @property
    def tie_fraction(self) -> float:
        return self.ties / self.n if self.n else math.nan


def pair_outcomes(scores_a: Sequence[float], scores_b: Sequence[float], tie_tolerance: float = 0.0) -> np.ndarray:
    """Per-pair outcome for A: 1 (A higher), 0.5 (|A - B| <= tolerance), 0 (B higher)."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win rate needs paired scores, got {a.shape} and {b.shape}")
    diff = a - b
    return np.where(np.abs(diff) <= tie_tolerance, 0.5, np.where(diff > 0, 1.0, 0.0))


def win_rate(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    tie_tolerance: float = 0.0,
    ci_method: str = "wilson",
    confidence: float = 0.95,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> WinRate:
    """Win rate of A vs B over paired scores, ties as half, with a Wilson or bootstrap confidence interval."""
    outcomes = pair_outcomes(scores_a, scores_b, tie_tolerance)
    n = int(outcomes.size)
    wins, ties = int((outcomes == 1.0).sum()), int((outcomes == 0.5).sum())
    rate = float(outcomes.mean()) if n else math.nan
    if ci_method == "wilson":
        lo, hi = wilson_interval(wins + 0.5 * ties, n, confidence)
    elif ci_method == "bootstrap":
        lo, hi = bootstrap_interval(outcomes, confidence, n_bootstrap, seed)
    else:
        raise ValueError(f"ci_method={ci_method!r} must be wilson or bootstrap")
    return WinRate(rate, lo, hi, wins, ties, n - wins - ties, n, ci_method)
