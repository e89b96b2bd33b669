"""Figures of a finished sweep (notebooks/05_sweep.ipynb): the KL-gold frontier over seeds with the fit of Gao et
al. (2022)'s form, and per grid cell mean and 95 % interval of headline numbers. Each returns a matplotlib Figure and
saves a PNG under ``<sweep>/plots/`` (closed in pyplot, as in rlhf_lib.evaluate.plots).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rlhf_lib.core.figures import data_digest, no_data, save_figure_in
from rlhf_lib.sweeps.stats import gao_gold, mean_ci, numeric_leaves


def cell_label(overrides: dict[str, Any]) -> str:
    """``kl_coef=0.05`` style label of a grid cell ("all" for a sweep over seeds only)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items()) or "all"


def frontier_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Per grid cell and checkpoint: mean, sd and 95 % Student-t half-width (``_ci95``, the summary tables' interval;
    NaN for one seed) over seeds of KL, RM gain and gold gain (gains over the reference)."""
    rows = pd.DataFrame(summary.get("frontier") or [])
    if rows.empty:
        return pd.DataFrame(columns=["cell", "label", "step", "n_seeds"])
    rows["cell"] = [cell_label(c) for c in rows["cell"]]
    rows["step"] = rows["step"].astype(float)
    values = [c for c in ("kl", "rm_gain", "gold_gain") if c in rows]
    grouped = rows.groupby(["cell", "label"], sort=False)
    table = grouped[values].agg(["mean", "std"])
    table.columns = [f"{name}_{stat}" for name, stat in table.columns]
    table["step"] = grouped["step"].mean()
    table["n_seeds"] = grouped.size()
    for name in values:
        table[f"{name}_ci95"] = [
            (m["ci95_high"] - m["mean"]) if m["ci95_high"] is not None else math.nan
            for m in (mean_ci(v) for v in grouped[name].apply(list))
        ]
    return table.reset_index().sort_values(["cell", "step"], kind="stable").reset_index(drop=True)


def frontier_digest(summary: dict[str, Any]) -> str:
    """:func:`rlhf_lib.core.figures.data_digest` of what :func:`plot_sweep_frontier` draws (the frontier table,
    rounded, and the fit): ``make docs`` stamps it into the PNG, so a test can tell a committed figure from a stale
    one, and a change elsewhere in the summary leaves the figure current."""
    table = frontier_table(summary).round(6)
    fit = {k: v for k, v in (summary.get("frontier_fit") or {}).items() if isinstance(v, (int, float)) or v is None}
    return data_digest({"frontier_table": table.to_csv(index=False), "frontier_fit": fit})


def _frontier_panel(ax, table: pd.DataFrame, column: str, title: str) -> None:
    if f"{column}_mean" not in table or table[f"{column}_mean"].isna().all():
        no_data(ax, f"no {column} in this sweep")
        return
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (cell, part) in enumerate(table.groupby("cell", sort=False)):
        part = part.sort_values("step")
        ax.errorbar(
            part["kl_mean"],
            part[f"{column}_mean"],
            xerr=part["kl_ci95"].fillna(0),
            yerr=part[f"{column}_ci95"].fillna(0),
            marker="o",
            ms=4,
            capsize=2,
            lw=1,
            color=colors[i % len(colors)],
            label=cell,
        )
        final = part[part["label"] == "final"]
        ax.plot(final["kl_mean"], final[f"{column}_mean"], marker="*", ms=11, ls="", color=colors[i % len(colors)])
    ax.plot([0.0], [0.0], marker="o", color="black", ls="", label="reference policy")  # zero of KL and gains
    ax.axhline(0.0, color="gray", lw=0.6)
    ax.set_xlabel("KL(policy || ref) per sequence (nats)")
    ax.set_ylabel(f"{column.replace('_', ' ')} over the reference")
    ax.set_title(title)


def plot_sweep_frontier(summary: dict[str, Any], folder: str | Path | None = None) -> Figure:
    """Gold (left) and proxy RM (right) gain vs KL: one line per grid cell through its checkpoints (star = final),
    seed means with 95 % Student-t error bars over seeds (the tables' interval); the fitted gold(d) =
    d (alpha - beta ln d), d = sqrt(KL), dashed."""
    table = frontier_table(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _frontier_panel(axes[0], table, "gold_gain", "gold (hidden objective)")
    _frontier_panel(axes[1], table, "rm_gain", "proxy: reward-model score")
    fit = summary.get("frontier_fit") or {}
    top = max(float(np.nanmax(table["kl_mean"])), fit.get("kl_at_peak") or 0.0) if len(table) else 0.0
    if fit.get("alpha") is not None and top > 0:
        kl = np.linspace(0.0, top * 1.05, 200)
        label = f"fit: alpha={fit['alpha']:.3f}, beta={fit['beta']:.3f}"
        axes[0].plot(kl, gao_gold(kl, fit["alpha"], fit["beta"]), "--", color="black", lw=1.2, label=label)
        if fit.get("kl_at_peak") is not None and math.isfinite(fit["kl_at_peak"]):
            axes[0].plot(
                [fit["kl_at_peak"]],
                [fit["gold_at_peak"]],
                marker="X",
                ms=10,
                color="black",
                label=f"fitted peak: KL {fit['kl_at_peak']:.2f}, gold {fit['gold_at_peak']:+.3f}",
            )
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"sweep {summary.get('sweep', '')}: KL-reward frontier, error bars 95 % t-interval over seeds")
    fig.tight_layout()
    if folder is not None:
        save_figure_in(fig, Path(folder) / "plots", "sweep_frontier")
    return fig


def plot_group_metrics(summary: dict[str, Any], keys: Sequence[str], folder: str | Path | None = None) -> Figure:
    """One panel per key: each grid cell's seed values (dots) and mean with its 95 % Student-t interval."""
    keys = [k for k in keys if any(k in g["metrics"] for g in summary["groups"])] or list(keys)[:1]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    names = {p["name"]: p for p in summary["points"]}
    for ax, key in zip(axes[0], keys):
        labels = []
        for i, group in enumerate(summary["groups"]):
            labels.append(cell_label(group["overrides"]))
            seeds = [numeric_leaves(names[n]["summary"]).get(key) for n in group["points"]]
            ax.plot([i] * len(seeds), [s for s in seeds], "o", color="tab:gray", ms=4, alpha=0.7)
            m = group["metrics"].get(key) or {}
            if m.get("mean") is None:
                continue
            low, high = m.get("ci95_low"), m.get("ci95_high")
            err = [[m["mean"] - low], [high - m["mean"]]] if low is not None else None
            ax.errorbar([i], [m["mean"]], yerr=err, fmt="s", color="tab:blue", capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
    fig.suptitle("per grid cell: seeds (dots), mean and 95 % Student-t interval over seeds")
    fig.tight_layout()
    if folder is not None:
        save_figure_in(fig, Path(folder) / "plots", "sweep_groups")
    return fig
