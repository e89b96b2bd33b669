"""Reward-model ensembles on one frozen trunk, their conservative combinations, and WARM.

``reward_model.ensemble = k`` trains k members on the same pairs (or, with ``ensemble_bootstrap``, each on a
bootstrap resample), each with its own seed for the adapters' initialisation and the data order. They share the
frozen trunk (:class:`rlhf_lib.reward.trunk.TrunkCache`: computed once for all of them), so a member costs only its
trained top blocks. Held-out, the stage reports:

- every member's accuracy against gold (Wilson 95 % interval over pairs);
- the members combined, each standardised first on its own scores of the training pairs' responses (samples of the
  reference policy): ``mean``, ``min`` (worst case) and ``uwo`` = mean - lambda * variance across members
  (uncertainty-weighted optimisation; Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization");
- WARM (Ramé et al. 2024, "WARM: On the Benefits of Weight Averaged Reward Models"): one model whose weights are the
  members' averaged -- each member's LoRA update merged first (Delta W = B A * scale; averaging A and B apart would
  not average the updates), the score heads averaged -- and, as its linear-mode-connectivity check, the accuracy of
  the midpoint of the first two members beside theirs.

WARM is one plain model, so every consumer (PPO, best-of-N, the evaluation, TRL's trainers) takes it unchanged: the
stage saves it as the reward model and :func:`rlhf_lib.reward.train.evaluate_reward_model` evaluates it as any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from rlhf_lib.core.intervals import wilson_interval
from rlhf_lib.reward.scoring import score_head

COMBINATIONS = ("mean", "min", "uwo")  # how member rewards are combined (module docstring)
ADAPTER = "default"  # the peft adapter every member trains


def standardise(scores: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(k, N) member scores -> each member's z-scores against its own (k,) mean and std."""
    return (scores - mean[:, None]) / np.maximum(std[:, None], 1e-8)


def combine(z: np.ndarray, how: str, uwo_coef: float = 0.5) -> np.ndarray:
    """(k, N) standardised member scores -> (N,) ensemble reward: mean, min, or mean - uwo_coef * variance."""
    if how == "mean":
        return z.mean(axis=0)
    if how == "min":
        return z.min(axis=0)
    if how == "uwo":
        return z.mean(axis=0) - uwo_coef * z.var(axis=0)  # variance across members, ddof 0 (Coste et al. 2023)
    raise ValueError(f"unknown ensemble combination {how!r}; use one of {COMBINATIONS}")


def bootstrap_sample(n: int, seed: int) -> list[int]:
    """n pair indices drawn with replacement: one member's bootstrap resample."""
    return np.random.default_rng(seed).integers(0, n, size=n).tolist()


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers of a model, in module order."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@dataclass
class MemberWeights:
    """What a member changed: each adapted linear layer's merged update, in :func:`lora_layers` order, and its head."""

    deltas: list[Tensor]  # Delta W = B A * scale of each adapted linear layer, (out, in)
    head: Tensor  # the score head's weight, (1, H)


def member_weights(model: nn.Module) -> MemberWeights:
    """A trained member's merged LoRA updates and head (copies, so the next member may reuse the modules)."""
    with torch.no_grad():
        deltas = [layer.get_delta_weight(ADAPTER).detach().clone() for layer in lora_layers(model)]
        return MemberWeights(deltas, score_head(model).weight.detach().clone())


def average(members: Sequence[MemberWeights]) -> MemberWeights:
    """The members' weights averaged (WARM): the mean merged update of each layer and the mean head."""
    deltas = [torch.stack(layer).mean(dim=0) for layer in zip(*(m.deltas for m in members))]
    return MemberWeights(deltas, torch.stack([m.head for m in members]).mean(dim=0))


def reset_member(model: nn.Module, seed: int, zero_head: bool) -> None:
    """Fresh adapters (peft's initialisation under ``seed``: A random, B zero) and head for the next member."""
    torch.manual_seed(seed)
    for layer in lora_layers(model):
        layer.reset_lora_parameters(ADAPTER, True)
    head = score_head(model)
    with torch.no_grad():
        if zero_head:
            head.weight.zero_()
        else:
            nn.init.normal_(head.weight, std=0.02)  # transformers' initializer_range default, as a fresh head


class WeightSetter:
    """Loads any :class:`MemberWeights` into the plain model that peft's ``unload()`` leaves (base weights kept)."""

    def __init__(self, peft_model: nn.Module) -> None:
        self.linears = [layer.base_layer for layer in lora_layers(peft_model)]  # the same modules after unload()
        self.base = [lin.weight.detach().clone() for lin in self.linears]
        self.model = peft_model.unload()

    @torch.no_grad()
    def load(self, weights: MemberWeights) -> nn.Module:
        for linear, base, delta in zip(self.linears, self.base, weights.deltas):
            linear.weight.copy_(base + delta.to(base.dtype))
        score_head(self.model).weight.copy_(weights.head)
        return self.model


@torch.no_grad()
def pair_scores(model: nn.Module, scorer: Any, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(N,), (N,) rewards of chosen and rejected for every pair of a PairScorer, with ``model``'s current weights."""
    chosen, rejected = [], []
    scorer.model = model
    for start in range(0, len(scorer.rows), batch_size):
        c, r, _ = scorer(list(range(start, min(start + batch_size, len(scorer.rows)))))
        chosen.append(c.float().cpu().numpy())
        rejected.append(r.float().cpu().numpy())
    return np.concatenate(chosen), np.concatenate(rejected)


def accuracy_vs_gold(rows: Sequence[dict[str, Any]], chosen: np.ndarray, rejected: np.ndarray) -> dict[str, Any]:
    """Share of held-out pairs (gold not tied) the rewards order as gold does (ties wrong), with a Wilson 95 % CI."""
    gold = np.asarray([float(r["gold_chosen"]) - float(r["gold_rejected"]) for r in rows])
    keep = gold != 0
    right = np.sign(chosen - rejected)[keep] == np.sign(gold[keep])
    n = int(keep.sum())
    low, high = wilson_interval(float(right.sum()), n)
    return {"accuracy_vs_gold": round(float(right.mean()), 4) if n else None, "ci": [round(low, 4), round(high, 4)]}


def has_gold(rows: Sequence[dict[str, Any]]) -> bool:
    return all(r.get("gold_chosen") is not None and r.get("gold_rejected") is not None for r in rows)


def ensemble_report(
    setter: WeightSetter,
    members: Sequence[MemberWeights],
    train: Any,
    held: Any,
    uwo_coef: float,
    batch_size: int,
) -> dict[str, Any]:
    """Every member, each combination, WARM and the two-member midpoint scored on the held-out pairs."""
    if not has_gold(held.rows):
        return {"members": len(members), "note": "the held-out pairs have no gold scores: nothing to report"}
    held_scores, stats = [], []
    for weights in members:
        model = setter.load(weights)
        tc, tr = pair_scores(model, train, batch_size)
        stats.append((float(np.concatenate([tc, tr]).mean()), float(np.concatenate([tc, tr]).std())))
        held_scores.append(pair_scores(model, held, batch_size))
    mean, std = (np.asarray(x) for x in zip(*stats))
    chosen = standardise(np.stack([c for c, _ in held_scores]), mean, std)  # (k, N)
    rejected = standardise(np.stack([r for _, r in held_scores]), mean, std)
    report: dict[str, Any] = {
        "members": len(members),
        "member": [accuracy_vs_gold(held.rows, c, r) for c, r in held_scores],
        "standardisation": [{"mean": round(m, 4), "std": round(s, 4)} for m, s in stats],
        "uwo_coef": uwo_coef,
    }
    for how in COMBINATIONS:
        report[how] = accuracy_vs_gold(held.rows, combine(chosen, how, uwo_coef), combine(rejected, how, uwo_coef))
    report["warm"] = accuracy_vs_gold(held.rows, *pair_scores(setter.load(average(members)), held, batch_size))
    midpoint = setter.load(average(members[:2]))
    report["lmc_midpoint"] = accuracy_vs_gold(held.rows, *pair_scores(midpoint, held, batch_size))
    report["lmc_endpoints"] = [m["accuracy_vs_gold"] for m in report["member"][:2]]
    return report


def summary_keys(report: dict[str, Any]) -> dict[str, Any]:
    """The stage summary's flat view of an ensemble report (the full report is ensemble.json)."""
    if "member" not in report:
        return {"ensemble_members": report["members"]}
    accs = [m["accuracy_vs_gold"] for m in report["member"]]
    out = {
        "ensemble_members": report["members"],
        "ensemble_member_accuracy_vs_gold": accs,
        "ensemble_member_accuracy_vs_gold_mean": round(float(np.mean(accs)), 4),
    }
    for how in (*COMBINATIONS, "warm", "lmc_midpoint"):
        out[f"ensemble_{how}_accuracy_vs_gold"] = report[how]["accuracy_vs_gold"]
    return out


def member_seeds(seed: int, k: int) -> list[int]:
    """Each member's seed (adapter initialisation and data order): member 0 is the single model's seed."""
    return [seed + 1000 * m for m in range(k)]


def check_ensemble(k: int, use_lora: bool) -> None:
    if k < 1:
        raise ValueError(f"reward_model.ensemble must be >= 1, got {k}")
    if k > 1 and not use_lora:
        raise ValueError("reward_model.ensemble > 1 needs use_lora: true (members are LoRA updates of one shared base)")
