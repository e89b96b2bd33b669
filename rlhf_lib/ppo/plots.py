"""The PPO stage's figure: training curves from ``ppo/metrics.jsonl`` (notebooks 03 and 04)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rlhf_lib.core.figures import TRAINED_COLOR, no_data, save_figure
from rlhf_lib.core.io import read_jsonl
from rlhf_lib.core.runs import Run

# PPO metrics plotted by plot_ppo_curves: TRL PPOTrainer names -> panel title.
PPO_CURVES = {
    "objective/scores": "RM score of rollouts",
    "objective/kl": "KL(policy || ref) per sequence",
    "objective/entropy": "entropy per sequence",
    "loss/value_avg": "value loss",
    "policy/clipfrac_avg": "policy clip fraction",
    "val/clipfrac_avg": "value clip fraction",
}


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
    """PPO training curves from ppo/metrics.jsonl vs episode (:func:`draw_ppo_curves`), saved as the run's
    plots/ppo_curves.png."""
    df = read_metrics(run.ppo_dir / "metrics.jsonl")
    fig = draw_ppo_curves(df, f"PPO training ({run.name})", metrics, smooth)
    save_figure(fig, run, "ppo_curves")
    return fig


def draw_ppo_curves(
    rows: str | Path | pd.DataFrame | Sequence[dict[str, Any]],
    title: str = "PPO training",
    metrics: Sequence[str] = tuple(PPO_CURVES),
    smooth: int = 0,
) -> Figure:
    """PPO training curves vs episode (scores, KL, entropy, value loss, clip fractions) from metric rows: a
    metrics.jsonl path, its rows as dicts, or their DataFrame. A metric the rows lack is a "not logged" panel; smooth
    is the moving-mean window (0: a twentieth of the updates). Returns the figure, unsaved."""
    if isinstance(rows, (str, Path)):
        df = read_metrics(Path(rows))
    else:
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    x_name = "episode" if "episode" in df.columns else None
    x = df[x_name].to_numpy(dtype=float) if x_name else np.arange(1, len(df) + 1, dtype=float)
    window = smooth or max(1, len(df) // 20)
    ncols = 3
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, metrics):
        ax.set_title(f"{name}\n{PPO_CURVES.get(name, '')}", fontsize=9)
        if name not in df.columns or df[name].isna().all():
            no_data(ax, "not logged")
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
    fig.suptitle(title)
    fig.tight_layout()
    return fig
