"""`make bench` (``python -m rlhf_lib.bench``): PPO and reward-model throughput, ours against TRL 1.12's PPOTrainer.

:mod:`.configs` names the workload and configurations; :mod:`.shapes` the workload sizes; :mod:`.workers` what runs
inside one measured subprocess; :mod:`.report` turns raw results into figures and ratios; :mod:`.plots` draws them;
:mod:`.cli` runs it all. No stage imports this package.
"""

__all__ = ["cli", "configs", "plots", "report", "shapes", "workers"]
