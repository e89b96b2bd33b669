"""Figures of the evaluation notebook (each returns a matplotlib Figure and saves a PNG under run.plots_dir) and of
`make bench` (:func:`plot_bench`, saved beside bench.json).

Figures are closed in pyplot after saving, so a notebook shows each one once (as the cell's value), and tests and
papermill runs never accumulate open figures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .io import atomic_file, read_jsonl
from .runs import Run

# PPO metrics plotted by plot_ppo_curves: TRL PPOTrainer names -> panel title.
PPO_CURVES = {
    "objective/scores": "RM score of rollouts",
    "objective/kl": "KL(policy || ref) per sequence",
    "objective/entropy": "entropy per sequence",
    "loss/value_avg": "value loss",
    "policy/clipfrac_avg": "policy clip fraction",
    "val/clipfrac_avg": "value clip fraction",
}
REFERENCE_COLOR, TRAINED_COLOR, GOLD_COLOR = "tab:gray", "tab:blue", "tab:orange"


def save_figure(fig: Figure, run: Run, name: str) -> Path:
    """Save fig as <plots_dir>/<name>.png (temp file + rename) and close it in pyplot; returns the path."""
    return save_figure_in(fig, run.plots_dir, name)


def save_figure_in(fig: Figure, directory: Path, name: str) -> Path:
    """Save fig as <directory>/<name>.png (atomically, so no half-written PNG) and close it; returns the path."""
    path = Path(directory) / f"{name}.png"
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------------------------------------------
# PPO training curves


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame (one row per logged update); a bad line raises naming the file and line."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the ppo stage (notebooks/03_ppo.ipynb) first")
    return pd.DataFrame(read_jsonl(path, torn_tail_ok=True))


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (nan-aware), window >= 1."""
    s = pd.Series(y, dtype="float64")
    return s.rolling(window, min_periods=1).mean().to_numpy()


def plot_ppo_curves(run: Run, metrics: Sequence[str] = tuple(PPO_CURVES), smooth: int = 0) -> Figure:
    """PPO training curves from ppo/metrics.jsonl vs episode: scores, KL, entropy, value loss, clip fractions."""
    df = read_metrics(run.ppo_dir / "metrics.jsonl")
    x_name = "episode" if "episode" in df.columns else None
    x = df[x_name].to_numpy(dtype=float) if x_name else np.arange(1, len(df) + 1, dtype=float)
    window = smooth or max(1, len(df) // 20)
    ncols = 3
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, metrics):
        ax.set_title(f"{name}\n{PPO_CURVES.get(name, '')}", fontsize=9)
        if name not in df.columns or df[name].isna().all():
            _no_data(ax, "not logged")
            continue
        y = df[name].to_numpy(dtype=float)
        if window > 1:
            ax.plot(x, y, color=TRAINED_COLOR, alpha=0.3, lw=1)
            ax.plot(x, _smooth(y, window), color=TRAINED_COLOR, lw=1.8, label=f"moving mean ({window})")
            ax.legend(fontsize=7)
        else:
            ax.plot(x, y, color=TRAINED_COLOR, lw=1.5, marker="o" if len(y) < 30 else None, ms=3)
        ax.set_xlabel(x_name or "update")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle(f"PPO training ({run.name})")
    fig.tight_layout()
    save_figure(fig, run, "ppo_curves")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# before / after


def _histogram_pair(ax, before: np.ndarray, after: np.ndarray, title: str) -> None:
    both = np.concatenate([before, after])
    both = both[np.isfinite(both)]
    if both.size == 0:
        _no_data(ax, "no scores")
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
        _no_data(axes[0, 0], "no checkpoints evaluated")
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
        _no_data(ax, "no eval results")
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
        _no_data(ax, "no eval results")
    else:
        ax.bar(x, kl, 0.6, color=TRAINED_COLOR)
        ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_title("KL(policy || reference), nats / sequence")

    ax = axes[2]
    rate = _column(df, "eval.win_rate_vs_ref")
    if rate is None:
        _no_data(ax, "no eval results")
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
        _no_data(ax, "no eval results")
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


# ----------------------------------------------------------------------------------------------------------------
# benchmark (make bench)

BENCH_PHASES = (
    ("generation_s", "generation", "tab:blue"),
    ("forward_s", "scoring / ref / value forwards", "tab:orange"),
    ("optimization_s", "PPO optimisation", "tab:green"),
)


def plot_bench(report: dict[str, Any], speed_target: float = 4.0, memory_target: float = 0.5) -> Figure:
    """`make bench` at a glance: seconds per PPO update by phase, peak RSS, and (with TRL) the speed ratio by round.

    `report` is bench.json's content. Targets are issue #6's: >= 4x TRL 1.12's episodes/s at <= 0.5x its peak RSS.
    """
    trl = report.get("trl") or {}
    # finished runs in bench.json's order: our configurations, then TRL's (bench names every TRL result)
    rows = [r for r in report["configs"].values() if r.get("kind") == "ppo"] + ([trl] if trl else [])
    rows = [r for r in rows if "episodes_per_s" in r]
    trl_shown = int("episodes_per_s" in trl)  # TRL's row comes last when it finished
    colors = ["tab:purple"] * (len(rows) - trl_shown) + ["tab:red"] * trl_shown
    by_round = report.get("episodes_per_s_ratio_vs_trl_by_round") or []
    fig, axes = plt.subplots(
        1,
        3 if by_round else 2,
        figsize=(16 if by_round else 12, 2.4 + 0.45 * max(len(rows), 2)),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2, 2][: 3 if by_round else 2]},
    )
    axes = axes[0]
    names = [r["name"] for r in rows]
    y = np.arange(len(rows))

    ax = axes[0]  # seconds per update, stacked by phase
    if not rows:
        _no_data(ax, "no PPO configuration finished")
    else:
        left = np.zeros(len(rows))
        for key, label, color in BENCH_PHASES:
            widths = np.array([r.get(key) or 0.0 for r in rows])
            ax.barh(y, widths, left=left, color=color, label=label)
            left += widths
        rest = np.array([max((r.get("s_per_update") or 0.0) - total, 0.0) for r, total in zip(rows, left)])
        ax.barh(y, rest, left=left, color="lightgray", label="other")
        for yi, r in zip(y, rows):
            vs = r.get("episodes_per_s_vs_trl")
            ax.annotate(
                f" {r['episodes_per_s']:.3f} ep/s" + (f" ({vs:.2f}x TRL)" if vs is not None else ""),
                (r.get("s_per_update") or 0.0, yi),
                va="center",
                fontsize=8,
            )
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per PPO update (lower is faster)")
        ax.margins(x=0.35)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.set_title("time per update by phase")

    ax = axes[1]  # peak RSS, with the memory target
    if not rows:
        _no_data(ax, "no PPO configuration finished")
    else:
        ax.barh(y, [r.get("peak_rss_gib") or 0.0 for r in rows], color=colors)
        if trl.get("peak_rss_gib"):
            ax.axvline(
                memory_target * trl["peak_rss_gib"],
                color="black",
                ls="--",
                lw=1,
                label=f"target: {memory_target:g}x TRL",
            )
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("peak RSS, GiB")
    ax.set_title("memory")

    if by_round:  # each round's ratio (ours and TRL taking turns) and the pooled one
        ax = axes[2]
        rounds = np.arange(1, len(by_round) + 1)
        ax.plot(rounds, [r if r is not None else np.nan for r in by_round], "o-", color="tab:purple", label="round")
        pooled = report.get("episodes_per_s_ratio_vs_trl")
        if pooled is not None:
            ax.axhline(pooled, color="tab:purple", lw=1, alpha=0.6, label=f"pooled {pooled:.2f}x")
        ax.axhline(speed_target, color="black", ls="--", lw=1, label=f"target {speed_target:g}x")
        ax.set_xticks(rounds)
        ax.set_ylim(0, 1.2 * max([speed_target, *[r for r in by_round if r is not None]]))
        ax.set_xlabel("round")
        ax.set_ylabel("episodes/s, ours / TRL")
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))
        ax.set_title(f"{report.get('reference_config')} vs TRL", fontsize=9)
    device = report.get("device") or {}
    fig.suptitle(
        f"make bench: {device.get('type', '?')}, {report.get('threads', '?')} threads, "
        f"OMP_WAIT_POLICY={report.get('omp_wait_policy', '?')}, {report.get('created', '')}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
