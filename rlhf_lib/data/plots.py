"""The data stage's figure: scores, response lengths and annotator noise of the written pairs (notebook 01)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_lib.data import annotator
from rlhf_lib.data.build import load_split


def plot_data_overview(run) -> "matplotlib.figure.Figure":  # noqa: F821
    """Gold/score distributions, response lengths and (simulated) label agreement vs gold gap; saved as PNG."""
    import matplotlib.pyplot as plt

    pairs = load_split(run, "train_pairs") + load_split(run, "eval_pairs")
    report = json.loads((Path(run.data_dir) / "report.json").read_text(encoding="utf-8"))
    simulated = report.get("gold_scorer") is not None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    key = "gold" if simulated else "score"
    c = [p[f"{key}_chosen"] for p in pairs if p[f"{key}_chosen"] is not None]
    r = [p[f"{key}_rejected"] for p in pairs if p[f"{key}_rejected"] is not None]
    ax = axes[0]
    if c and r:
        bins = np.histogram_bin_edges(c + r, bins=30)
        ax.hist(c, bins=bins, alpha=0.6, label="chosen")
        ax.hist(r, bins=bins, alpha=0.6, label="rejected")
        ax.set_xlabel("gold score (VADER compound)" if simulated else "dataset score")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no scores in this dataset", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{key} scores of pairs")
    ax = axes[1]
    lc, lr = [len(p["chosen_ids"]) for p in pairs], [len(p["rejected_ids"]) for p in pairs]
    bins = np.histogram_bin_edges(lc + lr, bins=30)
    ax.hist(lc, bins=bins, alpha=0.6, label="chosen")
    ax.hist(lr, bins=bins, alpha=0.6, label="rejected")
    ax.axvline(report["limits"]["max_response_length"], color="k", ls="--", lw=1, label="max_response_length")
    ax.set_xlabel("response tokens (incl. EOS)")
    ax.set_title("response lengths")
    ax.legend()
    ax = axes[2]
    if simulated:
        gap = np.array([abs(p["gold_chosen"] - p["gold_rejected"]) for p in pairs])
        agree = np.array([p["gold_chosen"] > p["gold_rejected"] for p in pairs], float)
        keep = gap > 0
        edges = np.linspace(0, max(gap.max(), 1e-6), 9)
        idx = np.clip(np.digitize(gap[keep], edges) - 1, 0, len(edges) - 2)
        centres = (edges[:-1] + edges[1:]) / 2
        frac = [agree[keep][idx == i].mean() if np.any(idx == i) else np.nan for i in range(len(centres))]
        ax.plot(centres, frac, "o-", label="labels agreeing with gold")
        xs = np.linspace(0, edges[-1], 100)
        ax.plot(
            xs,
            annotator.bt_probability(xs, 0 * xs, report["annotator_beta"]),
            "--",
            label=f"Bradley–Terry, beta={report['annotator_beta']}",
        )
        ax.set_xlabel("|gold gap| of the pair")
        ax.set_ylim(0.4, 1.02)
        ax.set_title("annotator noise")
        ax.legend()
    else:
        ax.hist([len(p["prompt_ids"]) for p in pairs], bins=30)
        ax.axvline(report["limits"]["max_prompt_length"], color="k", ls="--", lw=1)
        ax.set_xlabel("prompt tokens (chat template applied)")
        ax.set_title("prompt lengths")
    fig.tight_layout()
    Path(run.plots_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(run.plots_dir) / "data_overview.png", dpi=100)
    return fig
