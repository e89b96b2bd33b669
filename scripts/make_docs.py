"""Regenerate what the docs show from the committed JSON: ``make docs``.

- every generated table of README.md and docs/ (the blocks between ``<!-- name:start -->`` and ``<!-- name:end -->``,
  written by ``tests/test_readme.py --write``, whose test fails when one is stale);
- each shipped sweep's frontier figure, ``docs/sweeps/<sweep>/sweep_frontier.png``, from the ``summary.json`` beside it
  (the same 95 % interval over seeds as the tables), stamped with a digest of the plotted data so a test can tell a
  stale figure.

Figures of single runs (``docs/ppo_curves.png``, ``docs/compare/frontier.png``, ``docs/bench.png``) are copied from
the run folders that made them; their data is not committed yet.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_lib.sweeps import plots  # noqa: E402


def sweep_figures() -> list[Path]:
    """Redraw every shipped sweep frontier figure that has a committed summary beside it; returns the PNGs written."""
    written = []
    for summary_path in sorted((ROOT / "docs" / "sweeps").glob("*/summary.json")):
        figure = summary_path.with_name("sweep_frontier.png")
        if not figure.exists():
            continue  # a sweep without a frontier figure in the docs (e.g. the reward-model seeds)
        summary = json.loads(summary_path.read_text())
        fig = plots.plot_sweep_frontier(summary)
        # the digest of the plotted data, read back by tests/test_readme.py to catch a stale figure
        stamp = {"Description": f"{plots.DIGEST_PREFIX}{plots.frontier_digest(summary)}"}
        fig.savefig(figure, dpi=110, bbox_inches="tight", metadata=stamp)
        written.append(figure)
        print(f"wrote {figure.relative_to(ROOT)}")
    return written


def main() -> int:
    subprocess.run([sys.executable, str(ROOT / "tests" / "test_readme.py"), "--write"], check=True, cwd=ROOT)
    sweep_figures()
    return 0


if __name__ == "__main__":
    sys.exit(main())
