"""Stage 4, notebook ``04_evaluate``: did RLHF work, at what KL, and was the reward model over-optimised?

:mod:`.stage` runs the stage; :mod:`.sampling` is the one sampling-and-scoring path of every policy (also the
methods comparison's); :mod:`.reference_cache` keeps the reference's samples and scores, computed once per exact
inputs and read back by every later evaluation on them (the runs sharing a base run); :mod:`.stats` the pure
statistics (KL estimate, win rate with intervals); :mod:`.plots` the figures.
"""

from rlhf_lib.evaluate.plots import plot_frontier, plot_reward_distributions, plot_run_comparison
from rlhf_lib.evaluate.stage import (
    EvalConfig,
    EvalResult,
    compare_runs,
    comparison_run_dirs,
    evaluate_policies,
    overoptimisation_curve,
    sample_table,
    stage_summary,
)

__all__ = [
    "EvalConfig",
    "EvalResult",
    "compare_runs",
    "comparison_run_dirs",
    "evaluate_policies",
    "overoptimisation_curve",
    "plot_frontier",
    "plot_reward_distributions",
    "plot_run_comparison",
    "sample_table",
    "stage_summary",
]
