"""RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024) with TRL's ``RLOOTrainer`` / ``GRPOTrainer``.

Both sample ``num_generations`` responses per PPO prompt from the policy (pure sampling at the PPO temperature, at
most the PPO response length), score them with the stage-2 reward model, and use the group as the baseline. The
KL coefficient is TRL's ``beta``: RLOO subtracts beta x the sequence KL (k1) from the reward, as PPO shapes its
reward; GRPO adds beta x a per-token k3 KL term to the loss. With LoRA the reference is the adapter-off base.

The reward is :func:`rlhf_lib.compare.common.token_id_reward`: the reward model on the prompt's and the
completion's token ids (EOS kept), standardised with reward_stats.json like PPO's rewards -- the same scores the
evaluation reports as ``rm_score``. Losses, advantages and metrics (``reward``, ``kl``, ``completions/mean_length``,
``rewards/reward_model/mean``) are TRL's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_lib.compare.common import (
    LoraFields,
    MethodInputs,
    Stopwatch,
    lora_config,
    read_jsonl,
    reward_stats,
    save_policy,
    setting_inputs,
    token_id_reward,
    training_arguments,
    write_train_record,
)
from rlhf_lib.lm import models
from rlhf_lib.reward.combined import check_reward

PROMPT_COLUMN = "query_ids"  # the dataset column holding each prompt's token ids (for the reward function)
Scorer = Callable[[list[list[int]]], np.ndarray]


@dataclass
class OnlineMethodConfig(LoraFields):
    """Shared settings of RLOO and GRPO (TRL names), one run per KL coefficient."""

    enabled: bool = True  # train this method at all
    betas: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1])  # TRL `beta` (KL coefficient) values, one
    #   policy each
    learning_rate: float = 5.0e-4  # AdamW learning rate (LoRA scale)
    max_steps: int = 20  # optimiser steps (each samples per_device_train_batch_size responses)
    per_device_train_batch_size: int = 16  # responses per optimiser step: prompts x num_generations
    num_generations: int = 4  # responses per prompt, the group its baseline is computed over
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    num_iterations: int = 1  # optimisation passes over each generated batch (TRL's mu)
    epsilon: float = 0.2  # clip range of the policy ratio
    response_length: int | None = None  # TRL max_completion_length; None: the base run's PPO response_length
    temperature: float | None = None  # sampling temperature; None: the base run's PPO temperature
    reward_normalization: bool = True  # standardise RM scores with reward_stats.json (as PPO does)
    reward: str = "model"  # the reward optimised, as ppo.ensemble_reward: model (saved RM; WARM), mean, min or uwo
    lr_scheduler_type: str = "linear"  # transformers scheduler name
    max_prompts: int = 0  # use the first N PPO prompts; 0: all
    logging_steps: int = 1  # log TRL's metrics every N steps (kept in train.json)

    def check(self) -> None:
        name = type(self).__name__
        if not self.betas or any(b < 0 for b in self.betas):
            raise ValueError(f"{name}.betas={self.betas} must be a non-empty list of values >= 0")
        for key in (
            "max_steps",
            "per_device_train_batch_size",
            "num_generations",
            "gradient_accumulation_steps",
            "num_iterations",
            "logging_steps",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"{name}.{key}={getattr(self, key)} must be >= 1")
        if self.num_generations < 2:
            raise ValueError(f"{name}.num_generations={self.num_generations} must be >= 2 (the group baseline)")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"{name}.per_device_train_batch_size={self.per_device_train_batch_size} must be a "
                f"multiple of num_generations={self.num_generations}"
            )
        if self.learning_rate <= 0 or (self.temperature is not None and self.temperature <= 0):
            raise ValueError(f"{name}.learning_rate and temperature must be > 0")
        check_reward(self.reward, f"{name}.reward")


@dataclass
class RLOOMethodConfig(OnlineMethodConfig):
    """RLOO with TRL's RLOOTrainer."""

    normalize_advantages: bool = False  # RLOOConfig.normalize_advantages: standardise advantages per batch


@dataclass
class GRPOMethodConfig(OnlineMethodConfig):
    """GRPO with TRL's GRPOTrainer."""

    loss_type: str = "dapo"  # GRPOConfig.loss_type (TRL default dapo: token-level normalisation over the batch)
    scale_rewards: str = "group"  # GRPOConfig.scale_rewards: group (std within a group), batch or none (Dr. GRPO)


def prompts_dataset(data_dir: Path, tokenizer, max_prompts: int = 0):
    """ppo_prompts.jsonl as a TRL prompt dataset: the templated text (what TRL tokenizes) + its token ids."""
    from datasets import Dataset

    rows = read_jsonl(Path(data_dir) / "ppo_prompts.jsonl")
    rows = rows[:max_prompts] if max_prompts else rows
    for row in rows[:8]:  # TRL tokenizes the text itself; it must give the data stage's ids back
        if tokenizer(row["prompt_text"])["input_ids"] != row["prompt_ids"]:
            raise ValueError(
                f"{data_dir}/ppo_prompts.jsonl id {row.get('id')}: the tokenizer does not map "
                "prompt_text back to prompt_ids (special tokens added?); rebuild the data with this "
                "tokenizer or use a tokenizer that adds no special tokens"
            )
    return Dataset.from_dict(
        {"prompt": [r["prompt_text"] for r in rows], PROMPT_COLUMN: [r["prompt_ids"] for r in rows]}
    )


def default_scorer(inputs: MethodInputs, tokenizer, batch_size: int = 16, reward: str = "model") -> Scorer:
    """The stage-2 reward model (or its ensemble's members combined by ``reward``) scoring token ids, exactly as the
    evaluation stage does."""
    from rlhf_lib.evaluate.sampling import GenerationSettings, reward_model_scorer

    settings = GenerationSettings(
        response_length=1,
        temperature=1.0,
        batch_size=batch_size,
        seed=inputs.seed,
        device=inputs.torch_device(),
        dtype=inputs.torch_dtype(),
    )
    return reward_model_scorer(inputs.reward_model_dir, settings, tokenizer, reward=reward)


def train_online(
    kind: str,
    cfg: OnlineMethodConfig,
    inputs: MethodInputs,
    beta: float,
    out_dir: Path,
    response_length: int,
    temperature: float,
    scorer: Scorer | None = None,
) -> dict[str, Any]:
    """Train one RLOO or GRPO policy (kind 'rloo' / 'grpo') at KL coefficient `beta`; saves out_dir/policy and
    out_dir/train.json. `scorer` (token ids -> scores) replaces the reward model (tests)."""
    if kind not in ("rloo", "grpo"):
        raise ValueError(f"kind={kind!r} must be rloo or grpo")
    out_dir = Path(out_dir)
    tokenizer = models.load_tokenizer(inputs.model)
    dataset = prompts_dataset(inputs.data_dir, tokenizer, cfg.max_prompts)
    # a combined reward is already in standard units (each member standardised on its reference scores)
    normalise = scorer is None and cfg.reward_normalization and cfg.reward == "model"
    mean, std = reward_stats(inputs.reward_model_dir) if normalise else (0.0, 1.0)
    score = scorer or default_scorer(inputs, tokenizer, reward=cfg.reward)
    reward = token_id_reward(score, PROMPT_COLUMN, mean, std)
    args = _config(kind, cfg, inputs, beta, out_dir / "trainer", response_length, temperature)
    trainer_cls = _trainer(kind)
    model = models.load_causal_lm(inputs.model, tokenizer)
    trainer = trainer_cls(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
    )
    with Stopwatch() as clock:
        trainer.train()
    save_policy(trainer.model, tokenizer, out_dir / "policy")
    record = {
        "method": kind,
        "beta": beta,
        "reward": cfg.reward,
        "train_seconds": clock.seconds,
        "generated_tokens": reward.generated_tokens,
        "generated_responses": reward.generated_responses,
        "steps": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "inputs": setting_inputs(inputs, cfg),  # what a re-run checks before it reuses this setting
    }
    write_train_record(out_dir, record)
    return record


def _config(
    kind: str,
    cfg: OnlineMethodConfig,
    inputs: MethodInputs,
    beta: float,
    output_dir: Path,
    response_length: int,
    temperature: float,
):
    from trl import GRPOConfig, RLOOConfig

    values = training_arguments(
        inputs,
        output_dir,
        beta=beta,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        num_generations=cfg.num_generations,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_iterations=cfg.num_iterations,
        epsilon=cfg.epsilon,
        max_completion_length=response_length,
        temperature=temperature,
        top_p=1.0,
        top_k=0,  # pure sampling, as PPO and the evaluation sample
        lr_scheduler_type=cfg.lr_scheduler_type,
        logging_steps=cfg.logging_steps,
        disable_dropout=True,
    )
    if kind == "rloo":
        return RLOOConfig(**values, normalize_advantages=cfg.normalize_advantages)
    return GRPOConfig(**values, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards)


def _trainer(kind: str):
    from trl import GRPOTrainer, RLOOTrainer

    return RLOOTrainer if kind == "rloo" else GRPOTrainer
