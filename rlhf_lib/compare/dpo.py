"""DPO (Rafailov et al. 2023) with TRL's ``DPOTrainer`` on a run's stage-1 train pairs, reference = the initial policy.

The pairs are handed to TRL already tokenized (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, the columns
TRL's ``DataCollatorForPreference`` consumes): they are the exact token ids the reward model was trained on, EOS
included, while re-tokenizing their decoded text would not round-trip. So the one thing overridden is
``_prepare_dataset`` (tokenization); the loss, the reference log-probs and the metrics (``rewards/margins``,
``rewards/accuracies``, ...) are TRL's own. With LoRA the reference is the adapter-off base (TRL's PEFT path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_lib.compare.common import (
    LoraFields,
    MethodInputs,
    Stopwatch,
    lora_config,
    read_jsonl,
    save_policy,
    setting_inputs,
    training_arguments,
    write_train_record,
)
from rlhf_lib.lm import models

METHOD = "dpo"


@dataclass
class DPOMethodConfig(LoraFields):
    """DPO on the train pairs, one run per beta (TRL DPOConfig names)."""

    enabled: bool = True  # train DPO at all
    betas: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3])  # DPOConfig.beta values, one policy each
    #   (higher: closer to the reference)
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])  # DPOConfig.loss_type; sigmoid: the DPO paper's
    #   loss
    learning_rate: float = 5.0e-4  # AdamW learning rate (LoRA scale; TRL's default 1e-6 is for full fine-tuning)
    num_train_epochs: float = 1.0  # passes over the train pairs
    max_steps: int = -1  # optimiser steps; -1: num_train_epochs decides
    per_device_train_batch_size: int = 8  # pairs per optimiser step
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    lr_scheduler_type: str = "linear"  # transformers scheduler name
    warmup_steps: float = 0.0  # lr warmup: below 1 a fraction of the steps, from 1 up a number of steps
    max_length: int | None = 1024  # DPOConfig.max_length: prompt + response tokens kept (keep_start truncation)
    max_pairs: int = 0  # train on the first N pairs of train_pairs.jsonl; 0: all
    logging_steps: int = 1  # log TRL's metrics every N steps (kept in train.json)

    def check(self) -> None:
        if not self.betas or any(b <= 0 for b in self.betas):
            raise ValueError(f"dpo.betas={self.betas} must be a non-empty list of values > 0")
        if self.learning_rate <= 0 or self.num_train_epochs <= 0:
            raise ValueError("dpo.learning_rate and dpo.num_train_epochs must be > 0")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"dpo.{name}={getattr(self, name)} must be >= 1")
        if self.max_pairs < 0:
            raise ValueError(f"dpo.max_pairs={self.max_pairs} must be >= 0 (0: all pairs)")


def pairs_dataset(data_dir: Path, max_pairs: int = 0, max_length: int | None = None):
    """train_pairs.jsonl as a pre-tokenized TRL preference dataset (prompt_ids, chosen_ids, rejected_ids)."""
    from datasets import Dataset

    rows = read_jsonl(Path(data_dir) / "train_pairs.jsonl")
    rows = rows[:max_pairs] if max_pairs else rows
    if max_length is not None:  # as TRL's own preparation: a prompt that fills max_length leaves no completion
        rows = [r for r in rows if len(r["prompt_ids"]) < max_length]
    if not rows:
        raise ValueError(
            f"{data_dir}/train_pairs.jsonl has no usable pairs (max_pairs={max_pairs}, max_length={max_length})"
        )
    return Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})


def _trainer_class():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer fed the data stage's token ids as they are (see the module docstring)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


def train_dpo(cfg: DPOMethodConfig, inputs: MethodInputs, beta: float, out_dir: Path) -> dict[str, Any]:
    """Train one DPO policy at `beta`; saves out_dir/policy (as PPO's final policy) and out_dir/train.json."""
    from trl import DPOConfig

    out_dir = Path(out_dir)
    tokenizer = models.load_tokenizer(inputs.model)
    dataset = pairs_dataset(inputs.data_dir, cfg.max_pairs, cfg.max_length)
    model = models.load_causal_lm(inputs.model, tokenizer)
    args = DPOConfig(
        **training_arguments(
            inputs,
            out_dir / "trainer",
            beta=beta,
            loss_type=list(cfg.loss_type),
            learning_rate=cfg.learning_rate,
            num_train_epochs=cfg.num_train_epochs,
            max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            lr_scheduler_type=cfg.lr_scheduler_type,
            warmup_steps=cfg.warmup_steps,
            max_length=cfg.max_length,
            logging_steps=cfg.logging_steps,
        )
    )
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(cfg)
    )
    with Stopwatch() as clock:
        trainer.train()
    save_policy(trainer.model, tokenizer, out_dir / "policy")
    record = {
        "method": METHOD,
        "beta": beta,
        "train_seconds": clock.seconds,
        "generated_tokens": 0,  # offline: DPO trains on the fixed pairs, it samples nothing
        "n_pairs": len(dataset),
        "steps": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "inputs": setting_inputs(inputs, cfg),  # what a re-run checks before it reuses this setting
    }
    write_train_record(out_dir, record)
    return record
