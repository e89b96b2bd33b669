"""Stage 2, notebook ``02_reward_model``: a Bradley–Terry reward model (:mod:`.train`) trained by a loop with TRL
RewardTrainer's objective (:mod:`.fit`) on pairs packed one per row (:mod:`.packing`) over a frozen trunk computed
once (:mod:`.trunk`), ensembles and WARM (:mod:`.ensemble`), an ensemble's members combined as one reward
(:mod:`.combined`), scored as every consumer scores it (:mod:`.scoring`),
measured against gold on held-out pairs (:mod:`.metrics`) and drawn (:mod:`.plots`)."""

from rlhf_lib.reward.plots import plot_accuracy_by_strength, plot_calibration, plot_margins, plot_training_curve
from rlhf_lib.reward.train import EvalResult, RewardModelConfig, TrainResult, evaluate_reward_model, train_reward_model

__all__ = [
    "EvalResult",
    "RewardModelConfig",
    "TrainResult",
    "evaluate_reward_model",
    "plot_accuracy_by_strength",
    "plot_calibration",
    "plot_margins",
    "plot_training_curve",
    "train_reward_model",
]
