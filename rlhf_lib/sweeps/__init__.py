"""Seeds and parameter grids over shared upstream stages, notebook ``05_sweep``: ``python -m rlhf_lib.sweeps
params/sweeps/<name>.yaml``.

:mod:`.runner` turns a sweep file into ordinary runs and aggregates them; :mod:`.stats` holds the pure statistics
(mean and t interval over seeds, the KL–gold frontier and its fit, the selection rule, the generated tables);
:mod:`.plots` the figures.
"""

from rlhf_lib.sweeps.plots import frontier_table, plot_group_metrics, plot_sweep_frontier
from rlhf_lib.sweeps.runner import Sweep, SweepError, aggregate, load_sweep, run_sweep
from rlhf_lib.sweeps.stats import HEADLINE_KEYS, group_table, load_summary, points_table, sweep_dir

__all__ = [
    "HEADLINE_KEYS",
    "Sweep",
    "SweepError",
    "aggregate",
    "frontier_table",
    "group_table",
    "load_summary",
    "load_sweep",
    "plot_group_metrics",
    "plot_sweep_frontier",
    "points_table",
    "run_sweep",
    "sweep_dir",
]
