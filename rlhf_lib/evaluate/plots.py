"""Figures of the evaluation notebook: each returns a matplotlib Figure and saves a PNG under run.plots_dir.

Figures are closed in pyplot after saving, so a notebook shows each one once (as the cell's value), and tests and
papermill runs never accumulate open figures.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rlhf_lib.core.figures import GOLD_COLOR, REFERENCE_COLOR, TRAINED_COLOR, no_data, save_figure
from rlhf_lib.core.runs import Run

# ----------------------------------------------------------------------------------------------------------------
# before / after


def _histogram_pair(ax, before: np.ndarray, after: np.ndarray, title: str) -> None:
    both = np.concatenate([before, after])
    both = both[np.isfinite(both)]
    if both.size == 0:
        no_data(ax, "no scores")
        return
    lo, hi = float(both.min()), float(both.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 25)
    for values, color, label in ((before, REFERENCE_COLOR, "reference"), (after, TRAINED_COLOR, "trained")):
        ax.hist(values, bins=bins, alpha=0.5, color=color, label=f"{label} (mean {np.mean(values):+.3f})")
        ax.axvline(float(np.mean(values)), color=color, ls="--", lw=1.5)
    ax.set_title(title)
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)


def plot_reward_distributions(result: Any, run: Run) -> Figure:
    """Histograms of RM score (and gold score when the data has one) of reference vs trained responses."""
    df = result.samples
    has_gold = df["reference_gold"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_gold else 1, figsize=(11 if has_gold else 5.5, 3.6), squeeze=False)
    _histogram_pair(
        axes[0, 0], df["reference_rm"].to_numpy(float), df["trained_rm"].to_numpy(float), "reward-model score (proxy)"
    )
    axes[0, 0].set_xlabel("RM score")
    if has_gold:
        _histogram_pair(
            axes[0, 1], df["reference_gold"].to_numpy(float), df["trained_gold"].to_numpy(float), "gold score"
        )
        axes[0, 1].set_xlabel("gold score")
    fig.suptitle(f"held-out prompts, n={len(df)} ({run.name})")
    fig.tight_layout()
    save_figure(fig, run, "reward_distributions")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# KL-reward frontier / over-optimisation


def _frontier_panel(ax, curve: pd.DataFrame, column: str, color: str, title: str) -> None:
    x, y = curve["kl"].to_numpy(float), curve[column].to_numpy(float)
    n = curve["n_prompts"].to_numpy(float) if "n_prompts" in curve else np.ones_like(x)
    sem = curve[f"{column}_std"].to_numpy(float) / np.sqrt(np.maximum(n, 1)) if f"{column}_std" in curve else None
    ax.errorbar(x, y, yerr=sem, color=color, marker="o", capsize=3, lw=1.5)
    for xi, yi, label in zip(x, y, curve["label"]):
        ax.annotate(str(label), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot_frontier(curve: pd.DataFrame, run: Run) -> Figure:
    """RM (proxy) and gold score vs KL, one point per checkpoint (Gao et al. 2022 over-optimisation view)."""
    has_gold = "gold_score" in curve.columns and curve["gold_score"].notna().any()
    ncols = 3 if has_gold else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.8), squeeze=False)
    if curve.empty:
        no_data(axes[0, 0], "no checkpoints evaluated")
    else:
        curve = curve.sort_values("kl", kind="stable")
        _frontier_panel(axes[0, 0], curve, "rm_score", TRAINED_COLOR, "reward-model score (proxy)")
        axes[0, 0].set_ylabel("mean score (± s.e.)")
        if has_gold:
            _frontier_panel(axes[0, 1], curve, "gold_score", GOLD_COLOR, "gold score")
            # Both on one axis: gain over the reference in units of the reference's spread (scales differ).
            ax = axes[0, 2]
            ref = curve[curve["label"] == "reference"]
            base = ref.iloc[0] if len(ref) else curve.iloc[0]
            for column, color, label in (("rm_score", TRAINED_COLOR, "RM (proxy)"), ("gold_score", GOLD_COLOR, "gold")):
                spread = float(base[f"{column}_std"]) or 1.0
                ax.plot(curve["kl"], (curve[column] - base[column]) / spread, marker="o", color=color, label=label)
            ax.axhline(0.0, color="gray", lw=1)
            ax.set_xlabel("KL(policy || reference), nats per sequence")
            ax.set_ylabel("gain / reference std")
            ax.set_title("proxy vs gold: where gold stops rising")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(f"KL-reward frontier ({run.name})")
    fig.tight_layout()
    save_figure(fig, run, "kl_reward_frontier")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# run comparison


def _column(df: pd.DataFrame, name: str) -> np.ndarray | None:
    return df[name].to_numpy(float) if name in df.columns and df[name].notna().any() else None


def plot_run_comparison(df: pd.DataFrame, run: Run) -> Figure:
    """Runs side by side (a compare_runs table): score before/after, KL, win rate with CI, score vs KL."""
    names = [str(i) for i in df.index]
    x = np.arange(len(names))
    judge = "gold" if _column(df, "eval.after.gold_score") is not None else "rm"
    score = f"{judge}_score"
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))

    ax = axes[0]
    before, after = _column(df, f"eval.before.{score}"), _column(df, f"eval.after.{score}")
    if after is None:
        no_data(ax, "no eval results")
    else:
        if before is not None:
            ax.bar(x - 0.2, before, 0.4, color=REFERENCE_COLOR, label="reference")
        ax.bar(x + 0.2, after, 0.4, color=TRAINED_COLOR, label="trained")
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.legend(fontsize=8)
    ax.set_title(f"{'gold' if judge == 'gold' else 'RM'} score on held-out prompts")

    ax = axes[1]
    kl = _column(df, "eval.after.kl")
    if kl is None:
        no_data(ax, "no eval results")
    else:
        ax.bar(x, kl, 0.6, color=TRAINED_COLOR)
        ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_title("KL(policy || reference), nats / sequence")

    ax = axes[2]
    rate = _column(df, "eval.win_rate_vs_ref")
    if rate is None:
        no_data(ax, "no eval results")
    else:
        lo, hi = _column(df, "eval.win_rate_ci.0"), _column(df, "eval.win_rate_ci.1")
        yerr = None if lo is None or hi is None else np.vstack([rate - lo, hi - rate])
        ax.bar(x, rate, 0.6, color=TRAINED_COLOR, yerr=yerr, capsize=4)
        ax.axhline(0.5, color="gray", ls="--", lw=1)
        ax.set_ylim(0, 1)
        ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_title("win rate vs reference (95% CI)")

    ax = axes[3]
    if after is None or kl is None:
        no_data(ax, "no eval results")
    else:
        ax.scatter(kl, after, color=TRAINED_COLOR, zorder=3)
        for xi, yi, name in zip(kl, after, names):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if before is not None:
            ax.scatter(np.zeros_like(before), before, color=REFERENCE_COLOR, marker="x", label="reference")
            ax.legend(fontsize=8)
        ax.set_xlabel("KL, nats / sequence")
        ax.margins(0.15)
        ax.grid(alpha=0.3)
    ax.set_title(f"{'gold' if judge == 'gold' else 'RM'} score vs KL")
    fig.suptitle(f"run comparison ({len(names)} runs)")
    fig.tight_layout()
    save_figure(fig, run, "run_comparison")
    return fig
