"""Figures of the reward-model stage. Each returns a matplotlib Figure and, given a run, saves a PNG in plots_dir."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from rlhf_lib.core.runs import Run
    from rlhf_lib.reward.train import EvalResult


def _save(fig: Figure, run: "Run | None", name: str) -> Figure:
    fig.tight_layout()
    if run is not None:
        run.plots_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(run.plots_dir) / name, dpi=120)
    plt.close(fig)  # the Figure is returned for display; closing keeps pyplot from piling figures up
    return fig


def plot_training_curve(log_history: Sequence[dict[str, Any]], run: "Run | None" = None) -> Figure:
    """Training loss and pairwise accuracy per logged step (held-out ones too when evaluated during training)."""
    train = pd.DataFrame([e for e in log_history if "loss" in e and "step" in e])
    held = pd.DataFrame([e for e in log_history if "eval_loss" in e and "step" in e])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    if len(train):
        ax_loss.plot(train["step"], train["loss"], marker=".", label="train")
        if "accuracy" in train:
            ax_acc.plot(train["step"], train["accuracy"], marker=".", label="train (batch)")
    if len(held):
        ax_loss.plot(held["step"], held["eval_loss"], marker="o", label="held-out")
        if "eval_accuracy" in held:
            ax_acc.plot(held["step"], held["eval_accuracy"], marker="o", label="held-out")
    if len(train) and "epoch" in train and train["epoch"].iloc[-1] > 0:
        steps_per_epoch = train["step"].iloc[-1] / train["epoch"].iloc[-1]
        for epoch in range(1, int(np.ceil(train["epoch"].iloc[-1]))):
            for ax in (ax_loss, ax_acc):
                ax.axvline(epoch * steps_per_epoch, color="grey", lw=0.6, alpha=0.5)  # epoch boundaries
    ax_loss.axhline(np.log(2), color="grey", ls="--", lw=1, label="ln 2 (chance)")
    ax_acc.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    ax_loss.set(xlabel="optimiser step", ylabel="Bradley–Terry loss", title="Reward model loss")
    ax_acc.set(xlabel="optimiser step", ylabel="accuracy (ties wrong)", title="Pairwise accuracy", ylim=(0, 1))
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    return _save(fig, run, "reward_training_curve.png")


def plot_calibration(result: "EvalResult", run: "Run | None" = None) -> Figure:
    """Reliability diagram: predicted P(preferred) = sigmoid(reward gap) vs observed frequency, with bin counts."""
    table = result.calibration
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfectly calibrated")
    shown = table[table["n"] > 0]
    ax.plot(shown["mean_predicted"], shown["observed"], marker="o", label="reward model")
    for _, row in shown.iterrows():
        ax.annotate(
            str(int(row["n"])),
            (row["mean_predicted"], row["observed"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(3, -9),
        )
    ece = result.summary.get("eval_ece")
    ax.set(
        xlabel="predicted P(preferred) = sigmoid(r_a - r_b)",
        ylabel="observed frequency (labels)",
        title=f"Calibration on held-out pairs (ECE {ece})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, run, "reward_calibration.png")


def plot_margins(result: "EvalResult", run: "Run | None" = None) -> Figure:
    """Histogram of reward gaps r_chosen - r_rejected on held-out pairs (right of 0 = ranked as labelled)."""
    pairs = result.pairs
    fig, ax = plt.subplots(figsize=(6, 3.6))
    gap = pairs["gap"].to_numpy()
    bins = np.histogram_bin_edges(gap, bins=30)
    if pairs["correct_vs_gold"].notna().any():
        gold = pairs["correct_vs_gold"]
        ax.hist(gap[gold == 1], bins=bins, alpha=0.6, label="agrees with gold")
        ax.hist(gap[gold == 0], bins=bins, alpha=0.6, label="disagrees with gold")
    else:
        ax.hist(gap, bins=bins, alpha=0.8, label="held-out pairs")
    ax.axvline(0, color="k", lw=1)
    acc = result.summary.get("eval_accuracy")
    ax.set(
        xlabel="reward margin r_chosen - r_rejected",
        ylabel="pairs",
        title=f"Reward margins (accuracy vs labels {acc}, mean {np.mean(gap):.2f})",
    )
    ax.legend(fontsize=8)
    return _save(fig, run, "reward_margins.png")


def plot_accuracy_by_strength(result: "EvalResult", run: "Run | None" = None) -> Figure:
    """Accuracy per quantile bin of preference strength (gold gap, else dataset score gap)."""
    table = result.strength
    fig, ax = plt.subplots(figsize=(6, 3.6))
    by = table.attrs.get("strength_by")
    if len(table) == 0:
        ax.text(
            0.5,
            0.5,
            "no preference strength in this data\n(no gold or dataset scores)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    else:
        x = np.arange(len(table))
        has_gold = table["accuracy_vs_gold"].notna().any()
        width = 0.4 if has_gold else 0.8
        ax.bar(x - (width / 2 if has_gold else 0), table["accuracy"], width, label="vs labels")
        if has_gold:
            ax.bar(x + width / 2, table["accuracy_vs_gold"], width, label="vs gold")
        ax.set_xticks(
            x, [f"{lo:.2f}–{hi:.2f}\n(n={n})" for lo, hi, n in zip(table["low"], table["high"], table["n"])], fontsize=7
        )
        ax.legend(fontsize=8)
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set(
        xlabel=f"preference strength: {by}" if by else "preference strength",
        ylabel="accuracy (ties wrong)",
        ylim=(0, 1),
        title="Accuracy by preference strength",
    )
    return _save(fig, run, "reward_accuracy_by_strength.png")
