"""The reward model's Bradley–Terry training loop: TRL RewardTrainer's objective, on packed pairs and a cached trunk.

One loop, numbered as it runs::

    1. drop pairs longer than max_length (training_scorers); length-grouped batches (transformers'
       LengthGroupedSampler, a new order each epoch)
    2. the frozen trunk once (trainable_top_layers > 0, a Llama-family body): TrunkCache, shared by ensemble members
    3. per optimiser step, per micro-batch: rewards of the packed pairs (the top blocks on the cached trunk, or the
       whole model), loss = -log sigmoid(r_chosen - r_rejected [- margin]) [+ c * mean((r_chosen + r_rejected)^2)]
    4. clip the gradient norm, AdamW step (two groups: body, score head), scheduler step
    5. log TRL's keys every logging_steps (loss, accuracy, margin, min/mean/max_reward, grad_norm, learning_rate);
       held-out loss / accuracy every eval_steps

The objective, the optimiser groups, the warmup and schedule and the clipping are RewardTrainer's (as the stage ran
it); what changed is where the compute goes: a pair's prompt runs once (:mod:`rlhf_lib.reward.packing`) and frozen
blocks run once per training run, not once per epoch (:mod:`rlhf_lib.reward.trunk`). ``tests/test_reward_fit.py``
holds the loss and gradients equal to RewardTrainer's on the same batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from rlhf_lib.core import runtime
from rlhf_lib.lm import models
from rlhf_lib.reward.packing import pack_pairs
from rlhf_lib.reward.trunk import TrunkCache, can_split, pair_rewards, top_rewards


@dataclass
class FitResult:
    """What the loop did: its log (TRL's keys), wall time, the pairs it trained on and whether the trunk was cached."""

    log_history: list[dict[str, Any]]
    seconds: float
    n_pairs: int
    cached_trunk_blocks: int  # frozen blocks run once instead of every step (0: the whole model every step)

    @property
    def pairs_per_s(self) -> float:
        return self.n_pairs / max(self.seconds, 1e-9)


def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, center: float | None):
    """RewardTrainer's loss over a batch: Bradley–Terry, optional margin, optional centring penalty."""
    gap = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -nn.functional.logsigmoid(gap).mean()
    if center is not None:
        loss = loss + center * torch.mean((chosen + rejected) ** 2)
    return loss


def fits(row: dict[str, Any], max_length: int) -> bool:
    """RewardTrainer's length filter: both prompt + chosen and prompt + rejected within max_length tokens."""
    p = len(row["prompt_ids"])
    return p + len(row["chosen_ids"]) <= max_length and p + len(row["rejected_ids"]) <= max_length


def epoch_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator, grouped: bool) -> list[list]:
    """One epoch's micro-batches of indices: length-grouped megabatches (as Trainer's group_by_length) or shuffled."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if grouped:
        order = list(LengthGroupedSampler(batch_size, lengths=list(lengths), generator=generator))
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def warmup_steps(warmup: float, total: int) -> int:
    """Below 1 a fraction of the total steps (rounded up, as transformers does), from 1 up a number of steps."""
    return math.ceil(warmup * total) if warmup < 1 else int(warmup)


class PairScorer:
    """Rewards of a batch of pair indices: the top blocks on the cached trunk, or the whole model on packed pairs."""

    def __init__(self, model, rows, pad_id, first_block, device, dtype, margins=None) -> None:
        self.model, self.rows, self.pad_id, self.margins = model, rows, pad_id, margins
        self.device, self.dtype, self.first_block = device, dtype, first_block
        self.cache = TrunkCache(model, rows, pad_id, first_block, device, dtype) if first_block else None

    def __call__(self, idx: Sequence[int]):
        margins = None if self.margins is None else [self.margins[i] for i in idx]
        with runtime.autocast(self.device, self.dtype):
            if self.cache is not None:
                hidden, batch = self.cache.batch(idx, margins)
                chosen, rejected = top_rewards(self.model, hidden, batch, self.first_block)
            else:
                batch = pack_pairs([self.rows[i] for i in idx], self.pad_id, margins).to(self.device)
                chosen, rejected = pair_rewards(self.model, batch)
        return chosen, rejected, batch.margin


def first_trained_block(model: nn.Module, trainable_top_layers: int) -> int:
    """Index of the lowest block with trainable weights when the trunk below it can be cached, else 0."""
    top = models.top_block_indices(model, trainable_top_layers)
    return top[0] if top and can_split(model) else 0


def training_scorers(
    cfg: Any,
    model: nn.Module,
    rows: Sequence[dict[str, Any]],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    margins: Sequence[float] | None = None,
    eval_rows: Sequence[dict[str, Any]] | None = None,
) -> tuple[PairScorer | None, PairScorer | None]:
    """Step 1 and 2: the training pairs within max_length and the held-out pairs, each with its trunk computed once
    (shared by every ensemble member: the trunk is frozen). (None, ...) when no pair fits."""
    keep = [i for i, r in enumerate(rows) if fits(r, cfg.max_length)]  # RewardTrainer's filter
    if not keep:
        return None, None
    rows = [rows[i] for i in keep]
    margins = None if margins is None else [margins[i] for i in keep]
    first = first_trained_block(model, cfg.trainable_top_layers)
    score = PairScorer(model, rows, pad_id, first, device, dtype, margins)
    held = PairScorer(model, eval_rows, pad_id, first, device, dtype) if eval_rows else None
    return score, held


def fit_reward_model(
    cfg: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    score: PairScorer,
    held: PairScorer | None = None,
    seed: int | None = None,
    sample: Sequence[int] | None = None,
    desc: str = "reward model",
) -> FitResult:
    """Train ``model`` on the pairs of ``score`` with the settings of a RewardModelConfig (module docstring's steps).

    ``seed`` orders the data (default cfg.seed); ``sample`` trains on these pair indices instead of all (a bootstrap
    resample); ``held`` is evaluated every ``eval_steps`` steps.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    sample = list(range(len(score.rows))) if sample is None else list(sample)
    lengths = [sum(len(score.rows[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")) for i in sample]
    plan = StepPlan.build(cfg, lengths, cfg.seed if seed is None else seed)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, warmup_steps(cfg.warmup_steps, plan.total), plan.total)
    log = TrainLog(cfg.logging_steps)
    model.train()
    bar = tqdm(total=plan.total, desc=desc)
    for step, micro_batches in enumerate(plan.steps(), 1):
        stats = train_step(cfg, model, optimizer, score, [[sample[j] for j in mb] for mb in micro_batches])  # 3, 4
        scheduler.step()
        log.add(stats, step, plan.epoch_at(step), optimizer)  # 5.
        if held is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
            log.history.append({**evaluate_pairs(model, held, cfg.per_device_eval_batch_size), **log.where(step)})
            model.train()
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    log.finish(seconds, plan.total, plan.epoch_at(plan.total))
    model.eval()
    return FitResult(log.history, seconds, len(sample), score.first_block)


def train_step(cfg, model, optimizer, score: PairScorer, micro_batches: list[list[int]]) -> dict[str, Any]:
    """One optimiser step over its micro-batches (gradient accumulation); returns the step's batch statistics."""
    optimizer.zero_grad(set_to_none=True)
    losses, rewards, correct, gaps = [], [], [], []
    for idx in micro_batches:
        chosen, rejected, margin = score(idx)
        loss = pair_loss(chosen, rejected, margin, cfg.center_rewards_coefficient)
        (loss / len(micro_batches)).backward()
        losses.append(loss.item())
        rewards.append(torch.cat([chosen, rejected]).detach())
        correct.append((chosen > rejected).float().mean().item())
        gaps.append((chosen - rejected).mean().item())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    all_rewards = torch.cat(rewards)
    return {
        "loss": sum(losses) / len(losses),
        "grad_norm": float(grad_norm),
        "accuracy": sum(correct) / len(correct),
        "margin": sum(gaps) / len(gaps),
        "min_reward": float(all_rewards.min()),
        "mean_reward": float(all_rewards.mean()),
        "max_reward": float(all_rewards.max()),
    }


@torch.no_grad()
def evaluate_pairs(model: nn.Module, score: PairScorer, batch_size: int) -> dict[str, float]:
    """Held-out Bradley–Terry loss, accuracy and margin (TRL's eval_* keys)."""
    model.eval()
    n, loss, correct, gap = 0, 0.0, 0.0, 0.0
    for start in range(0, len(score.rows), batch_size):
        idx = list(range(start, min(start + batch_size, len(score.rows))))
        chosen, rejected, _ = score(idx)
        loss += float(pair_loss(chosen, rejected, None, None)) * len(idx)
        correct += float((chosen > rejected).float().sum())
        gap += float((chosen - rejected).sum())
        n += len(idx)
    return {"eval_loss": loss / n, "eval_accuracy": correct / n, "eval_margin": gap / n}


@dataclass
class StepPlan:
    """Every epoch's micro-batches grouped into optimiser steps; ``total`` steps as Trainer counts them."""

    epochs: list[list[list[int]]]  # per epoch, its optimiser steps, each a list of micro-batches
    total: int
    steps_per_epoch: int

    @classmethod
    def build(cls, cfg: Any, lengths: Sequence[int], seed: int | None = None) -> StepPlan:
        # the data order: seeded, different every epoch
        generator = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
        accum = cfg.gradient_accumulation_steps
        n_batches = math.ceil(len(lengths) / cfg.per_device_train_batch_size)
        steps_per_epoch = max(math.ceil(n_batches / accum), 1)
        total = math.ceil(cfg.num_train_epochs * steps_per_epoch)
        epochs = []
        for _ in range(math.ceil(total / steps_per_epoch)):
            batches = epoch_batches(lengths, cfg.per_device_train_batch_size, generator, cfg.group_by_length)
            epochs.append([batches[i : i + accum] for i in range(0, len(batches), accum)])
        return cls(epochs, total, steps_per_epoch)

    def steps(self):
        """The optimiser steps in order, stopping at ``total`` (a fractional last epoch stops early)."""
        flat = (step for epoch in self.epochs for step in epoch)
        for _, step in zip(range(self.total), flat):
            yield step

    def epoch_at(self, step: int) -> float:
        return round(step / self.steps_per_epoch, 4)


class TrainLog:
    """Averages the step statistics over each logging window into Trainer-style log_history entries."""

    def __init__(self, every: int) -> None:
        self.every, self.window, self.history, self.losses = every, [], [], []

    def where(self, step: int) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": step}

    def add(self, stats: dict[str, Any], step: int, epoch: float, optimizer) -> None:
        self.window.append(stats)
        self.losses.append(stats["loss"])
        self.epoch = epoch
        if step == 1 or step % self.every == 0:  # the first step too, as logging_first_step
            entry = {k: sum(s[k] for s in self.window) / len(self.window) for k in self.window[0]}
            entry["min_reward"] = min(s["min_reward"] for s in self.window)
            entry["max_reward"] = max(s["max_reward"] for s in self.window)
            entry["learning_rate"] = optimizer.param_groups[0]["lr"]
            self.history.append({**entry, **self.where(step)})
            self.window = []

    def finish(self, seconds: float, step: int, epoch: float) -> None:
        mean_loss = sum(self.losses) / max(len(self.losses), 1)
        self.history.append({"train_runtime": round(seconds, 2), "train_loss": mean_loss, "epoch": epoch, "step": step})
