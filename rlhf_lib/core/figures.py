"""Figure helpers every stage shares: save a figure atomically as PNG and close it, mark an empty panel, the colours.

Figures are closed in pyplot after saving, so a notebook shows each one once (as the cell's value), and tests and
papermill runs never accumulate open figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from rlhf_lib.core.io import atomic_file

if TYPE_CHECKING:
    from rlhf_lib.core.runs import Run

REFERENCE_COLOR, TRAINED_COLOR, GOLD_COLOR = "tab:gray", "tab:blue", "tab:orange"


def save_figure(fig: Figure, run: "Run", name: str) -> Path:
    """Save fig as <plots_dir>/<name>.png (temp file + rename) and close it in pyplot; returns the path."""
    return save_figure_in(fig, run.plots_dir, name)


def save_figure_in(fig: Figure, directory: Path, name: str) -> Path:
    """Save fig as <directory>/<name>.png (atomically, so no half-written PNG) and close it; returns the path."""
    path = Path(directory) / f"{name}.png"
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def no_data(ax, text: str) -> None:
    """Grey centred text on an empty panel, no ticks."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])
