"""Policy averaging: the exact mean of k PPO seeds' updates, interpolated towards the reference.

    W(eta) = W_ref + eta * (1/k) * sum_i (W_i - W_ref)

Each saved PPO policy holds its LoRA update merged (W_i = W_ref + s B_i A_i), so the mean of the merged weights is the
mean of the seeds' updates B_i A_i, never A and B averaged separately (which would be a different, non-linear
function of the seeds). eta = 1 is the seeds' average, eta < 1 walks it back along the line to the reference: less KL,
less reward. Weight averaging of fine-tuned policies and its interpolation towards the initialisation are WARP
(Ramé et al. 2024, "WARP: On the Benefits of Weight Averaged Rewarded Policies") and rewarded soups (Ramé et al.
2023); averaging independent runs' noise away is the model-soups argument (Wortsman et al. 2022). Each eta is one
policy, evaluated like every other method, with its KL measured rather than assumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from rlhf_lib.compare.common import save_policy
from rlhf_lib.lm import models

METHOD = "ppo_average"


def interpolate(
    reference: Mapping[str, torch.Tensor], members: Sequence[Mapping[str, torch.Tensor]], eta: float
) -> dict[str, torch.Tensor]:
    """W_ref + eta * mean_i (W_i - W_ref) per tensor, in fp32; every member must have the reference's keys and
    shapes (the same architecture, fully merged)."""
    if not members:
        raise ValueError("policy averaging needs at least one policy")
    out: dict[str, torch.Tensor] = {}
    for name, ref in reference.items():
        ref32 = ref.detach().float()
        update = torch.zeros_like(ref32)
        for i, member in enumerate(members):
            if name not in member or member[name].shape != ref.shape:
                got = "missing" if name not in member else tuple(member[name].shape)
                raise ValueError(f"policy {i} has {name} {got}, the reference {tuple(ref.shape)}: not the same model")
            update += member[name].detach().float() - ref32
        out[name] = ref32 + (eta / len(members)) * update
    return out


def average_policy(model_ref: str, member_dirs: Sequence[Path], eta: float, tokenizer, out_dir: Path) -> Path:
    """Write the policy W(eta) of the saved policies in ``member_dirs`` (full HF folders) on ``model_ref`` (the
    reference they were trained from) into ``out_dir`` as a full HF folder, atomically."""
    model = models.load_causal_lm(model_ref, tokenizer).float()  # the reference, fp32: W_ref
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    members = [models.load_causal_lm(str(d), tokenizer).float().state_dict() for d in member_dirs]
    model.load_state_dict(interpolate(reference, members, eta))
    del members, reference
    return save_policy(model, tokenizer, Path(out_dir))
