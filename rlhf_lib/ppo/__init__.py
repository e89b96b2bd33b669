"""Stage 3, notebook ``03_ppo``: PPO on a language model against the reward model, on ``accelerate``.

:mod:`.trainer` is the one numbered loop; :mod:`.core` its pure tensor maths; :mod:`.rollout` the prompt stream and
one update's experience; :mod:`.checkpoints` save / resume / load; :mod:`.metrics` the logged metrics and their
glossary; :mod:`.plots` the training curves.
"""

from rlhf_lib.ppo.plots import plot_ppo_curves
from rlhf_lib.ppo.trainer import PPOConfig, PPOResult, PPOTrainer, sample_table, train_ppo

__all__ = ["PPOConfig", "PPOResult", "PPOTrainer", "plot_ppo_curves", "sample_table", "train_ppo"]
