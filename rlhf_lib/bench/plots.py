"""The figure of `make bench`: seconds per PPO update by phase, peak RSS, and the speed ratio against TRL by round."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from rlhf_lib.core.figures import no_data

BENCH_PHASES = (
    ("generation_s", "generation", "tab:blue"),
    ("forward_s", "scoring / ref / value forwards", "tab:orange"),
    ("optimization_s", "PPO optimisation", "tab:green"),
)


def plot_bench(report: dict[str, Any], speed_target: float = 4.0, memory_target: float = 0.5) -> Figure:
    """`make bench` at a glance: seconds per PPO update by phase, peak RSS, and (with TRL) the speed ratio by round.

    `report` is bench.json's content. Targets are the project's: >= 4x TRL 1.12's episodes/s at <= 0.5x its peak RSS.
    """
    trl = report.get("trl") or {}
    # finished runs in bench.json's order: our configurations, then TRL's (bench names every TRL result)
    rows = [r for r in report["configs"].values() if r.get("kind") == "ppo"] + ([trl] if trl else [])
    rows = [r for r in rows if "episodes_per_s" in r]
    by_round = report.get("episodes_per_s_ratio_vs_trl_by_round") or []
    panels = 3 if by_round else 2
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(16 if by_round else 12, 2.4 + 0.45 * max(len(rows), 2)),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2, 2][:panels]},
    )
    _phase_panel(axes[0][0], rows)
    _memory_panel(axes[0][1], rows, trl, memory_target)
    if by_round:
        _ratio_panel(axes[0][2], report, by_round, speed_target)
    device = report.get("device") or {}
    fig.suptitle(
        f"make bench: {device.get('type', '?')}, {report.get('threads', '?')} threads, "
        f"OMP_WAIT_POLICY={report.get('omp_wait_policy', '?')}, {report.get('created', '')}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _phase_panel(ax, rows: list[dict[str, Any]]) -> None:
    """Seconds per update, one bar per run stacked by phase, annotated with episodes/s (and the ratio to TRL)."""
    ax.set_title("time per update by phase")
    if not rows:
        no_data(ax, "no PPO configuration finished")
        return
    y, left = np.arange(len(rows)), np.zeros(len(rows))
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
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per PPO update (lower is faster)")
    ax.margins(x=0.35)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.3))


def _memory_panel(ax, rows: list[dict[str, Any]], trl: dict[str, Any], memory_target: float) -> None:
    """Peak RSS per run (TRL's bar red, the last one when it finished), with the memory target as a line."""
    ax.set_title("memory")
    if not rows:
        no_data(ax, "no PPO configuration finished")
        return
    trl_shown = int("episodes_per_s" in trl)
    colors = ["tab:purple"] * (len(rows) - trl_shown) + ["tab:red"] * trl_shown
    y = np.arange(len(rows))
    ax.barh(y, [r.get("peak_rss_gib") or 0.0 for r in rows], color=colors)
    if trl.get("peak_rss_gib"):
        target = memory_target * trl["peak_rss_gib"]
        ax.axvline(target, color="black", ls="--", lw=1, label=f"target: {memory_target:g}x TRL")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("peak RSS, GiB")


def _ratio_panel(ax, report: dict[str, Any], by_round: list[float | None], speed_target: float) -> None:
    """Each round's episodes/s ratio to TRL (ours and TRL taking turns), the pooled ratio and the speed target."""
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
