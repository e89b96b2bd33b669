"""Alternatives to PPO on the same data, reward model and gold: best-of-N, DPO, RLOO and GRPO.

Each trained method reads a finished run's stage-1 data and stage-2 reward model by path
(:class:`~rlhf_lib.methods.common.MethodInputs`) and writes ``<folder>/policy`` the way the PPO stage writes its
final policy, plus ``<folder>/train.json`` (train_seconds, generated_tokens, TRL's log history).
:mod:`rlhf_lib.compare` evaluates them all with the evaluation stage's code.
"""

from .best_of_n import BestOfNConfig
from .common import MethodInputs, load_policy_folder, save_policy
from .dpo import DPOMethodConfig, train_dpo
from .online import GRPOMethodConfig, RLOOMethodConfig, train_online

__all__ = [
    "BestOfNConfig",
    "DPOMethodConfig",
    "GRPOMethodConfig",
    "MethodInputs",
    "RLOOMethodConfig",
    "load_policy_folder",
    "save_policy",
    "train_dpo",
    "train_online",
]
