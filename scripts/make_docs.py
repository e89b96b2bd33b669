"""Regenerate what the docs show from the committed JSON: ``make docs``.

- every generated table of README.md and docs/ (the blocks between ``<!-- name:start -->`` and ``<!-- name:end -->``,
  written by ``tests/test_readme.py --write``, whose test fails when one is stale);
- every figure README.md and docs/ show (:func:`doc_figures`), each from the committed data beside or named with it,
  stamped with a digest of that data (:func:`rlhf_lib.core.figures.save_stamped`), so tests/test_readme.py can tell a
  stale figure:

  - ``docs/sweeps/<sweep>/sweep_frontier.png`` from the ``summary.json`` beside it (the same 95 % interval over seeds
    as the tables; the digest covers the plotted frontier and fit only);
  - ``docs/compare/**/frontier.png`` from the comparison ``summary.json`` beside it;
  - ``docs/bench.png`` from ``docs/bench-cpu-r3l.json``, and each ``docs/gpu/<name>.png`` from ``<name>.json`` beside
    it (``make bench``'s figure);
  - ``docs/ppo_curves.png`` from ``docs/pipeline/ppo_metrics.jsonl`` (the default profile run's ``ppo/metrics.jsonl``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_lib.core.figures import data_digest, save_stamped  # noqa: E402

DOCS = ROOT / "docs"
BENCH_FIGURE, BENCH_SOURCE = DOCS / "bench.png", DOCS / "bench-cpu-r3l.json"
PPO_FIGURE, PPO_SOURCE = DOCS / "ppo_curves.png", DOCS / "pipeline" / "ppo_metrics.jsonl"


@dataclass(frozen=True)
class DocFigure:
    """One figure the docs show: drawn by ``draw`` from the data in ``source``, stamped with ``digest`` of it."""

    figure: Path
    source: Path
    draw: Callable[[Any], Any]  # data -> matplotlib Figure
    digest: Callable[[Any], str] = data_digest

    def data(self) -> Any:
        """The committed data: a JSON file's content, or a JSONL file's rows."""
        if self.source.suffix == ".jsonl":
            from rlhf_lib.core.io import read_jsonl

            return read_jsonl(self.source)
        return json.loads(self.source.read_text(encoding="utf-8"))

    def write(self) -> Path:
        data = self.data()
        return save_stamped(self.draw(data), self.figure, self.digest(data))


def _sweep_frontier(summary: dict[str, Any]):
    from rlhf_lib.sweeps import plots

    return plots.plot_sweep_frontier(summary)


def _sweep_digest(summary: dict[str, Any]) -> str:
    from rlhf_lib.sweeps import plots

    return plots.frontier_digest(summary)


def _compare_frontier(summary: dict[str, Any]):
    from rlhf_lib.compare import report

    return report.plot_frontier(summary)


def _bench(report: dict[str, Any]):
    from rlhf_lib.bench.plots import plot_bench

    return plot_bench(report)


def _ppo_curves(rows: list[dict[str, Any]]):
    from rlhf_lib.ppo.plots import draw_ppo_curves

    return draw_ppo_curves(rows, f"PPO training ({PPO_SOURCE.relative_to(ROOT)})")


def doc_figures() -> list[DocFigure]:
    """Every figure make docs draws, including those whose ``source`` is not committed yet (those it leaves alone)."""
    figures = [  # a sweep without a frontier figure in the docs (e.g. the reward-model seeds) is not drawn
        DocFigure(s.with_name("sweep_frontier.png"), s, _sweep_frontier, _sweep_digest)
        for s in sorted((DOCS / "sweeps").glob("*/summary.json"))
        if s.with_name("sweep_frontier.png").exists()
    ]
    figures += [
        DocFigure(s.with_name("frontier.png"), s, _compare_frontier)
        for s in sorted((DOCS / "compare").glob("**/summary.json"))
        if s.with_name("frontier.png").exists()
    ]
    figures.append(DocFigure(BENCH_FIGURE, BENCH_SOURCE, _bench))
    figures += [DocFigure(p, p.with_suffix(".json"), _bench) for p in sorted((DOCS / "gpu").glob("*.png"))]
    figures.append(DocFigure(PPO_FIGURE, PPO_SOURCE, _ppo_curves))
    return figures


def draw_figures() -> list[Path]:
    """Redraw every doc figure whose data is committed; returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for entry in doc_figures():
        if not entry.source.exists():
            print(f"kept {entry.figure.relative_to(ROOT)}: {entry.source.relative_to(ROOT)} is not committed")
            continue
        written.append(entry.write())
        print(f"wrote {entry.figure.relative_to(ROOT)} (from {entry.source.relative_to(ROOT)})")
    return written


def main() -> int:
    subprocess.run([sys.executable, str(ROOT / "tests" / "test_readme.py"), "--write"], check=True, cwd=ROOT)
    draw_figures()
    return 0


if __name__ == "__main__":
    sys.exit(main())
