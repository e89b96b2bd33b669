"""Figure helpers every stage shares: save a figure atomically as PNG and close it, mark an empty panel, the colours.

Figures are closed in pyplot after saving, so a notebook shows each one once (as the cell's value), and tests and
papermill runs never accumulate open figures.

A figure the docs ship is drawn from committed JSON by ``make docs`` and stamped with :func:`data_digest` of that
data (:func:`save_stamped`, read back by :func:`read_stamp`), so a test can tell a stale figure without comparing
pixels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    return _write_png(fig, Path(directory) / f"{name}.png")


def _write_png(fig: Figure, path: Path, metadata: dict[str, str] | None = None) -> Path:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return path


# The PNG text key and prefix under which save_stamped writes the digest (read_stamp reads them).
STAMP_KEY, STAMP_PREFIX = "Description", "rlhf-lab data sha256 "


def data_digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no whitespace): equal for equal data, whatever the key order
    or the file's layout; anything JSON cannot hold is written as its str()."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_stamped(fig: Figure, path: str | Path, digest: str) -> Path:
    """Save fig as the PNG ``path`` (atomically) with ``digest`` of the data it draws in its text, and close it."""
    return _write_png(fig, Path(path), {STAMP_KEY: STAMP_PREFIX + digest})


def read_stamp(path: str | Path) -> str | None:
    """The digest :func:`save_stamped` wrote into the PNG ``path``, or None when it carries none."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get(STAMP_KEY, "")
    return text[len(STAMP_PREFIX) :] if text.startswith(STAMP_PREFIX) else None


def no_data(ax, text: str) -> None:
    """Grey centred text on an empty panel, no ticks."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])
