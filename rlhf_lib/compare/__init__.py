"""Methods on one KL–gold frontier, notebook ``06_compare_methods``: PPO against best-of-N, DPO, RLOO and GRPO on
one finished run's data, reward model and gold. ``python -m rlhf_lib.compare --params params/compare/<profile>.yaml``.

Each trained method reads the base run's stage-1 data and stage-2 reward model by path
(:class:`~rlhf_lib.compare.common.MethodInputs`; what every method shares is in :mod:`.common`) and writes
``<folder>/policy`` the way the PPO stage writes its final policy, plus ``<folder>/train.json``.
:mod:`.best_of_n` is inference-time; :mod:`.dpo` and :mod:`.online` (RLOO, GRPO) wrap TRL's trainers;
:mod:`.average` averages PPO runs' policies towards the reference; :mod:`.runner` evaluates every policy with
the evaluation stage's code; :mod:`.report` shows the result and :mod:`.frontier` says whether a trained policy beat
best-of-16 within the KL budget.
"""

from rlhf_lib.compare.best_of_n import BestOfNConfig
from rlhf_lib.compare.common import MethodInputs, load_policy_folder, save_policy
from rlhf_lib.compare.dpo import DPOMethodConfig, train_dpo
from rlhf_lib.compare.online import GRPOMethodConfig, RLOOMethodConfig, train_online
from rlhf_lib.compare.runner import CompareConfig, Profile, load_profile, load_summary, run_comparison

__all__ = [
    "BestOfNConfig",
    "CompareConfig",
    "DPOMethodConfig",
    "GRPOMethodConfig",
    "MethodInputs",
    "Profile",
    "RLOOMethodConfig",
    "load_policy_folder",
    "load_profile",
    "load_summary",
    "run_comparison",
    "save_policy",
    "train_dpo",
    "train_online",
]
