"""Stage 2: train a Bradley–Terry reward model, evaluate it honestly, hand it on to PPO.

Notebook flow (02_reward_model)::

    cfg = config.from_namespace("reward_model", globals())
    run = runs.start_stage(cfg, "reward_model")
    trained = reward.train_reward_model(cfg, run)          # saves the trained model (merged LoRA)
    reward.plot_training_curve(trained.log_history, run)
    result = reward.evaluate_reward_model(cfg, run)        # reloads the SAVED model, scores held-out pairs
    reward.plot_calibration(result, run)                   # also plot_margins, plot_accuracy_by_strength
    runs.finish_stage(run, "reward_model", result.summary)

Design notes:
- The training loop (:mod:`rlhf_lib.reward.fit`) optimises TRL RewardTrainer's objective with its optimiser settings,
  on pairs packed one per row (the prompt runs once for chosen and rejected) and, when only the top blocks train,
  with the frozen blocks run once per training run instead of once per epoch. :func:`reward_trainer` builds TRL's
  RewardTrainer with the same settings: the reference that tests and ``make bench`` compare the loop with.
- Pairs are pre-tokenized (``prompt_ids`` + response ids), so the RM scores exactly the token sequences PPO will
  score: EOS only where the response finished. TRL's text formats append EOS to every response, which would make a
  truncated response look finished.
- The score head starts at zero and has its own, larger learning rate: TRL's fresh N(0, 0.02²) head on hidden states
  of norm ~45 gives noisy initial rewards, and at lr 1e-5 the RM stayed at chance.
- Evaluation reloads the saved folder, so what is evaluated is what PPO gets (the original notebook saved an
  untrained copy). Accuracy counts ties as wrong; degenerate rewards (NaN, near-constant) stop the stage.

Loading and scoring a saved reward model: :mod:`rlhf_lib.reward.scoring`; the evaluation's numbers (accuracy,
calibration, strength, length baseline): :mod:`rlhf_lib.reward.metrics`; figures: :mod:`rlhf_lib.reward.plots`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_lib.core import runtime
from rlhf_lib.core.config import CommonConfig
from rlhf_lib.core.io import JSONLError, iter_jsonl, write_json_atomic
from rlhf_lib.core.runs import Run, read_json
from rlhf_lib.lm import models
from rlhf_lib.reward import ensemble as ens
from rlhf_lib.reward.combined import ENSEMBLE_FILE, adapted_layer_names, member_factors, save_members
from rlhf_lib.reward.ensemble import check_ensemble
from rlhf_lib.reward.fit import FitResult, fit_reward_model, training_scorers
from rlhf_lib.reward.metrics import (
    DegenerateRewardsError,
    baseline_accuracy,
    bt_loss,
    calibration_table,
    check_rewards,
    expected_calibration_error,
    length_predictions,
    pairs_frame,
    pairwise_accuracy,
    strength_table,
)
from rlhf_lib.reward.scoring import (
    STATS_FILE,
    backbone,
    check_same_tokenizer,
    load_reward_model,
    score_head,
    score_pairs,
)

logger = logging.getLogger(__name__)

__all__ = [
    "RewardModelConfig",
    "TrainResult",
    "EvalResult",
    "read_pairs",
    "train_reward_model",
    "evaluate_reward_model",
]

TRAINING_FILE = "training.json"

EVAL_SCORES_FILE = "eval_scores.csv"
PAIR_FIELDS = ("id", "prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class RewardModelConfig(CommonConfig):
    """Reward-model stage: Bradley–Terry training with TRL's RewardTrainer, then held-out evaluation."""

    base_model: str = ""  # model the RM starts from; empty: common.model. Another reference must share its tokenizer
    use_lora: bool = True  # train LoRA adapters (+ the full score head) instead of every weight; merged before saving
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (the scale is lora_alpha / lora_r)
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # modules given adapters;
    #   ["all-linear"]: every linear layer but the head
    num_hidden_layers: int = 0  # keep only the bottom N transformer blocks of base_model (0: all); a shallower RM
    #   trains and scores faster
    trainable_top_layers: int = 0  # train only the top N transformer blocks (LoRA or full), freeze the rest; 0: all.
    #   Fewer: faster backward
    learning_rate: float = 5e-4  # AdamW lr of the body (LoRA adapters, or all weights when use_lora is false: use ~2e-5
    #   there)
    head_learning_rate: float = 1e-3  # AdamW lr of the score head (its own group: a small lr leaves a fresh head at
    #   chance)
    zero_init_head: bool = True  # start the score head at 0 so initial rewards are 0, not noise from a random head
    weight_decay: float = 0.0  # AdamW weight decay (all trainable weights)
    warmup_steps: float = 0.05  # lr warmup: below 1 a fraction of the total steps, from 1 up a number of steps
    lr_scheduler_type: str = "linear"  # transformers scheduler name (linear, cosine, constant_with_warmup, ...)
    per_device_train_batch_size: int = 8  # preference pairs per optimisation step (each pair is 2 sequences)
    gradient_accumulation_steps: int = 1  # steps whose gradients are summed before one optimiser update
    per_device_eval_batch_size: int = 16  # pairs per scoring batch in evaluation
    num_train_epochs: float = 1.0  # passes over the training pairs
    torch_compile: bool = False  # speed, same maths: torch.compile each transformer block (one graph for all) where a
    #   compiler is present (C++ on CPU, Triton on CUDA); compiling costs time once, repaid per training step
    group_by_length: bool = True  # batch pairs of similar length (transformers' LengthGroupedSampler): less padding,
    #   ~10 % faster on the default pairs
    max_grad_norm: float = 1.0  # gradient clipping
    max_length: int = 1024  # pairs whose prompt+response is longer than this many tokens are dropped (counted in the
    #   summary)
    center_rewards_coefficient: float | None = None  # TRL's mean-zero reward penalty (Eisenstein et al. 2023, Eq. 2),
    #   e.g. 0.01; None: off
    use_margin: bool = False  # subtract each pair's `margin` field inside the loss (Llama 2 margin loss); every pair
    #   needs a margin
    logging_steps: int = 10  # log training loss/accuracy every N optimiser steps
    eval_steps: int = 0  # also evaluate on the held-out pairs every N steps during training (for the curve); 0: never
    calibration_bins: int = 10  # bins of predicted P(chosen) in the calibration plot
    strength_bins: int = 4  # quantile bins of preference strength (gold gap, else score gap) for accuracy-by-strength
    min_reward_std: float = 1e-4  # evaluation fails when the std of rewards is below this (degenerate reward model)
    ensemble: int = 1  # k reward models on one shared frozen trunk, each with its own seed; k > 1 saves their
    #   weight average (WARM) as the reward model and reports members, mean / min / uwo and WARM (reward.ensemble)
    ensemble_bootstrap: bool = False  # each member trains on a bootstrap resample of the pairs instead of all
    ensemble_uwo_coef: float = 0.5  # lambda of the uwo combination, mean - lambda * variance across members

    def check(self) -> None:
        """Cross-field checks."""
        for name in ("learning_rate", "head_learning_rate", "num_train_epochs", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "max_length",
            "calibration_bins",
            "strength_bins",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.use_lora and (self.lora_r < 1 or not self.lora_target_modules):
            raise ValueError("use_lora needs lora_r >= 1 and at least one entry in lora_target_modules")
        check_ensemble(self.ensemble, self.use_lora)
        if self.warmup_steps < 0 or self.eval_steps < 0 or self.trainable_top_layers < 0:
            raise ValueError("warmup_steps, eval_steps and trainable_top_layers must be >= 0")

    @property
    def rm_base(self) -> str:
        """The reference the reward model starts from."""
        return self.base_model or self.model


@dataclass
class TrainResult:
    """What training produced: the trained (merged) model, its log and throughput."""

    model: PreTrainedModel  # the trained model, exactly what was saved
    tokenizer: PreTrainedTokenizerBase
    path: Path
    log_history: list[dict[str, Any]]
    seconds: float
    pairs_per_s: float
    n_train_pairs: int
    n_dropped_too_long: int

    @property
    def summary(self) -> dict[str, Any]:
        return {
            "train_seconds": round(self.seconds, 2),
            "train_pairs_per_s": round(self.pairs_per_s, 3),
            "n_train_pairs": self.n_train_pairs,
            "n_train_dropped_too_long": self.n_dropped_too_long,
        }


@dataclass
class EvalResult:
    """Held-out evaluation: headline numbers, one row per pair, calibration and strength tables."""

    summary: dict[str, Any]
    pairs: pd.DataFrame
    calibration: pd.DataFrame
    strength: pd.DataFrame
    stats: dict[str, Any]

    def _repr_html_(self) -> str:  # shows nicely as a notebook cell's result
        return pd.Series(self.summary, name="reward_model").to_frame()._repr_html_()


# ----------------------------------------------------------------------------
# data


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """Read a pairs JSONL file of the data contract, checking the token-id fields of every row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the data stage (notebooks/01_data_prep) for this run first")
    rows = []
    try:
        for lineno, row in iter_jsonl(path):
            _check_pair_row(row, path, lineno)
            rows.append(row)
    except JSONLError as err:
        raise ValueError(f"{err}; re-run the data stage") from None
    if not rows:
        raise ValueError(f"{path} holds no pairs; re-run the data stage")
    return rows


def _check_pair_row(row: dict[str, Any], path: Path, lineno: int) -> None:
    """The token-id fields of one pair row are present, integer lists and non-empty."""
    for key in PAIR_FIELDS:
        if key not in row:
            raise ValueError(f"{path}, line {lineno}: missing field {key!r}; re-run the data stage")
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = row[key]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"{path}, line {lineno}: field {key!r} must be a list of token ids")
    if not row["chosen_ids"] or not row["rejected_ids"]:
        raise ValueError(
            f"{path}, line {lineno} (id {row['id']}): empty chosen_ids/rejected_ids; "
            "the data stage must drop empty responses"
        )


def _check_pad_free(rows: Sequence[dict[str, Any]], pad_id: int, path: Path) -> None:
    """The classifier locates the last real token as the last non-pad id, so no real token may be the pad id."""
    for i, row in enumerate(rows, 1):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if pad_id in row[key]:
                raise ValueError(
                    f"{path}, line {i} (id {row['id']}): {key} contains the pad token id {pad_id}; the reward model "
                    "would read its score at the wrong token. Drop such pairs in the data stage."
                )


def _margins(rows: Sequence[dict[str, Any]], path: Path) -> list[float]:
    out = []
    for i, row in enumerate(rows, 1):
        margin = row.get("margin")
        if margin is None or not math.isfinite(float(margin)):
            raise ValueError(
                f"{path}, line {i} (id {row['id']}): use_margin is set but `margin` is {margin!r}; "
                "set use_margin: false or give every pair a finite margin"
            )
        out.append(float(margin))
    return out


def pairs_dataset(rows: Sequence[dict[str, Any]], margins: list[float] | None = None):
    """Pre-tokenized preference dataset in TRL's processed format: prompt + response ids, scored exactly as given."""
    from datasets import Dataset

    columns: dict[str, list] = {
        "chosen_ids": [r["prompt_ids"] + r["chosen_ids"] for r in rows],
        "rejected_ids": [r["prompt_ids"] + r["rejected_ids"] for r in rows],
    }
    if margins is not None:
        columns["margin"] = margins
    # the padded width of a pair's two sequences, for length-grouped batches (group_by_length)
    columns["length"] = [max(len(c), len(r)) for c, r in zip(columns["chosen_ids"], columns["rejected_ids"])]
    return Dataset.from_dict(columns)


# ----------------------------------------------------------------------------
# model


def build_reward_model(
    cfg: RewardModelConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> PreTrainedModel:
    """Sequence classifier (num_labels=1) from cfg.rm_base, dropout off, optional zero head, LoRA, torch.compile."""
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    with suppress_seqcls_warning():  # TRL's filter for the expected "score.weight missing / lm_head unexpected" report
        model = models.load_sequence_classifier(cfg.rm_base, tokenizer, device, cfg.num_hidden_layers)
    head = score_head(model)
    if cfg.zero_init_head:
        torch.nn.init.zeros_(head.weight)  # rewards start at exactly 0 (a random head stays at chance)
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)
    top = models.top_block_indices(model, cfg.trainable_top_layers)
    if cfg.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = (
            models.linear_layer_names(model)
            if cfg.lora_target_modules == ["all-linear"]
            else list(cfg.lora_target_modules)
        )
        peft_config = LoraConfig(
            task_type="SEQ_CLS",
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=targets,
            modules_to_save=["score"],  # TRL RewardTrainer docs: the head must be trained in full
            layers_to_transform=top,
        )
        model = get_peft_model(model, peft_config)
    elif top is not None:
        # freeze the embeddings and the lower blocks; the top blocks, final norm and head train
        lower = models.transformer_blocks(model)[: top[0]]
        embeddings = [m for m in backbone(model).modules() if isinstance(m, torch.nn.Embedding)]
        frozen = {id(p) for m in (*lower, *embeddings) for p in m.parameters()}
        for param in model.parameters():
            param.requires_grad = id(param) not in frozen
    from rlhf_lib.lm.policy_models import should_compile  # where a compiler is present; else eager, the same maths

    if should_compile(cfg.torch_compile, device, "reward_model.torch_compile"):
        models.compile_blocks(model)  # train_reward_model undoes it before the short evaluation
    return model


def reward_optimizer(cfg: RewardModelConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with the score head in its own parameter group (own lr), everything else trainable at learning_rate."""
    head_params = {id(p) for p in score_head(model).parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) in head_params]
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_params]
    if not head:
        raise RuntimeError("the score head is not trainable; with LoRA it must be in modules_to_save")
    groups = [{"params": body, "lr": cfg.learning_rate}, {"params": head, "lr": cfg.head_learning_rate}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _reward_config(cfg: RewardModelConfig, device: torch.device, dtype: torch.dtype, output_dir: str, has_eval: bool):
    from trl import RewardConfig

    return RewardConfig(
        output_dir=output_dir,
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,  # fp32 master weights, bf16 autocast (runtime.pick_dtype decides)
        fp16=dtype == torch.float16,  # fp16 autocast with loss scaling (GPUs without bf16)
        activation_checkpointing=False,  # TRL's gradient_checkpointing=True default only costs compute at these sizes
        disable_dropout=True,
        learning_rate=cfg.learning_rate,  # used by the scheduler only: the optimizer is ours (two groups)
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and cfg.eval_steps) else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="no",  # one save, of the final model, by us
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        # random megabatches of 50 steps, sorted by length inside: the collator pads to the longest of a batch
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,  # keep "length" for the sampler; TRL's collator reads only its own columns
    )


# ----------------------------------------------------------------------------
# training


def reward_trainer(
    cfg: RewardModelConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    dtype: torch.dtype,
    train_dataset: Any,
    output_dir: str,
    eval_dataset: Any = None,
    callbacks: list | None = None,
):
    """TRL's RewardTrainer exactly as the reward-model stage runs it (its arguments, optimiser groups), for the stage
    and for `make bench`, which times its steps on synthetic pairs."""
    from trl import RewardTrainer

    return RewardTrainer(
        model=model,
        args=_reward_config(cfg, device, dtype, output_dir, eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        optimizers=(reward_optimizer(cfg, model), None),  # the scheduler is built by Trainer over both groups
        callbacks=callbacks,
    )


def train_reward_model(cfg: RewardModelConfig, run: Run) -> TrainResult:
    """Train the RM (an ensemble: its members, saved as their weight average) on run.data_dir/train_pairs.jsonl and
    save it to run.reward_model_dir."""
    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    tokenizer = models.load_tokenizer(cfg.model)
    if cfg.rm_base != cfg.model:
        check_same_tokenizer(models.load_tokenizer(cfg.rm_base), tokenizer, f"reward model base {cfg.rm_base!r}")

    train_rows, margins, eval_rows = _stage_pairs(cfg, run, tokenizer)
    model = build_reward_model(cfg, tokenizer, device)
    _announce(cfg, model, len(train_rows), device, dtype)
    start = time.perf_counter()
    score, held = training_scorers(cfg, model, train_rows, tokenizer.pad_token_id, device, dtype, margins, eval_rows)
    trunk_seconds = time.perf_counter() - start  # the frozen trunk run once over the pairs (0 without a cache)
    if score is None:
        raise ValueError(f"every training pair is longer than max_length={cfg.max_length}; raise max_length")
    if cfg.ensemble > 1:
        trained, fits, report = _train_ensemble(cfg, model, score, held)
    else:
        fits, report = [fit_reward_model(cfg, model, reward_optimizer(cfg, model), score, held)], None
        models.uncompile_blocks(model)  # evaluation is a few no-grad batches: not worth another compile
        trained = model.merge_and_unload() if cfg.use_lora else model  # a plain HF classifier for every consumer
    seconds = time.perf_counter() - start
    for fitted in fits:
        _check_training_log(fitted.log_history)
    trained.eval()

    def beside_model(folder: Path) -> None:  # an ensemble's report and members, saved with the model in one rename
        if report is not None:
            save_members(folder, report.pop("_factors"), report.pop("_layers"))
            write_json_atomic(folder / ENSEMBLE_FILE, report)

    path = _save_model(trained, tokenizer, run.reward_model_dir, beside_model)
    n_used = len(score.rows)
    result = TrainResult(
        model=trained,
        tokenizer=tokenizer,
        path=path,
        log_history=fits[0].log_history,
        seconds=seconds,
        pairs_per_s=n_used * cfg.num_train_epochs * len(fits) / max(seconds, 1e-9),
        n_train_pairs=n_used,
        n_dropped_too_long=len(train_rows) - n_used,
    )
    training = {**result.summary, "rm_base": cfg.rm_base, "device": str(device), "dtype": str(dtype)}
    training["cached_trunk_blocks"] = fits[0].cached_trunk_blocks
    training["trunk_seconds"] = round(trunk_seconds, 2)  # part of train_seconds
    training["log_history"] = result.log_history
    if len(fits) > 1:
        training["member_log_histories"] = [f.log_history for f in fits]
    write_json_atomic(path / TRAINING_FILE, training)
    print(f"trained in {seconds:.0f} s ({result.pairs_per_s:.2f} pairs/s); saved to {path}")
    return result


def _train_ensemble(cfg: RewardModelConfig, model, score, held) -> tuple[PreTrainedModel, list[FitResult], dict]:
    """k members on the shared trunk (reward.ensemble), each reset to fresh adapters and head with its own seed;
    returns their weight average (WARM) as a plain classifier, each member's fit, and the held-out report."""
    members, factors, fits = [], [], []
    for m, seed in enumerate(ens.member_seeds(cfg.seed, cfg.ensemble)):
        if m:  # member 0 is the model as built: the single reward model of this seed
            ens.reset_member(model, seed, cfg.zero_init_head)
        sample = ens.bootstrap_sample(len(score.rows), seed) if cfg.ensemble_bootstrap else None
        desc = f"reward model {m + 1}/{cfg.ensemble}"
        fits.append(fit_reward_model(cfg, model, reward_optimizer(cfg, model), score, held, seed, sample, desc))
        members.append(ens.member_weights(model))
        factors.append(member_factors(model))
    models.uncompile_blocks(model)
    layers = adapted_layer_names(model)
    setter = ens.WeightSetter(model)
    report = ens.ensemble_report(setter, members, score, held, cfg.ensemble_uwo_coef, cfg.per_device_eval_batch_size)
    print(json.dumps(ens.summary_keys(report)))
    report.update(_factors=factors, _layers=layers)  # saved beside the model (reward.combined.MEMBERS_FILE)
    return setter.load(ens.average(members)), fits, report


def _stage_pairs(cfg: RewardModelConfig, run: Run, tokenizer):
    """The data stage's training pairs, their margins when the loss uses them, and the held-out pairs when
    ``eval_steps`` asks for mid-training evaluations."""
    train_path, eval_path = run.data_dir / "train_pairs.jsonl", run.data_dir / "eval_pairs.jsonl"
    train_rows = read_pairs(train_path)
    _check_pad_free(train_rows, tokenizer.pad_token_id, train_path)
    margins = _margins(train_rows, train_path) if cfg.use_margin else None
    eval_rows = read_pairs(eval_path) if cfg.eval_steps or cfg.ensemble > 1 else None
    return train_rows, margins, eval_rows


def _announce(cfg: RewardModelConfig, model, n_pairs: int, device, dtype) -> None:
    """Log and print what is trained: base, pairs, trainable parameters, LoRA or full, device and precision."""
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    how = f"LoRA r={cfg.lora_r}" if cfg.use_lora else "full fine-tuning"
    logger.info(
        "reward model %s: %s trainable parameters (%s), %s, %s", cfg.rm_base, f"{n_trainable:,}", how, device, dtype
    )
    print(
        f"training reward model from {cfg.rm_base}: {n_pairs} pairs, {n_trainable:,} trainable parameters "
        f"({how}), {device}, {str(dtype).split('.')[-1]}"
    )


def _check_training_log(log_history: list[dict[str, Any]]) -> None:
    losses = [e["loss"] for e in log_history if "loss" in e]
    if any(not math.isfinite(x) for x in losses):
        raise DegenerateRewardsError(f"training loss became NaN/inf ({losses}); lower learning_rate/head_learning_rate")


def _save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """save_pretrained (and ``extra`` files) into a temporary sibling, then rename, so a crash never leaves a
    half-saved model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------
# evaluation


def _mean_or_none(x: pd.Series) -> float | None:
    x = x.dropna()
    return round(float(x.mean()), 4) if len(x) else None


def _training_keys(folder: Path) -> dict[str, Any]:
    """What training recorded beside the saved model, for the stage summary (an ensemble's report included)."""
    training = read_json(folder / TRAINING_FILE, {})
    keys = {k: training.get(k) for k in ("train_seconds", "train_pairs_per_s", "n_train_pairs")}
    ensemble = read_json(folder / ENSEMBLE_FILE, None)
    if ensemble is not None:  # the saved model is the members' weight average; the members' report beside it
        keys.update(ens.summary_keys(ensemble))
    return keys


def evaluate_reward_model(cfg: RewardModelConfig, run: Run) -> EvalResult:
    """Reload the saved RM, score the held-out pairs, compute every metric, save reward_stats.json beside the model."""
    start = time.perf_counter()
    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    model, tokenizer, _ = load_reward_model(run.reward_model_dir, device, require_stats=False)
    check_same_tokenizer(tokenizer, models.load_tokenizer(cfg.model))
    eval_path = run.data_dir / "eval_pairs.jsonl"
    rows = read_pairs(eval_path)
    train_rows = read_pairs(run.data_dir / "train_pairs.jsonl")
    _check_pad_free(rows, tokenizer.pad_token_id, eval_path)

    reward_chosen, reward_rejected = score_pairs(
        model, rows, tokenizer.pad_token_id, cfg.per_device_eval_batch_size, dtype
    )
    all_rewards = np.concatenate([reward_chosen, reward_rejected])
    check_rewards(all_rewards, cfg.min_reward_std, f"rewards on {eval_path}")
    pairs = pairs_frame(rows, reward_chosen, reward_rejected, tokenizer.eos_token_id)
    if pairs["tie"].mean() > 0.5:
        raise DegenerateRewardsError(
            f"{int(pairs['tie'].sum())} of {len(pairs)} held-out pairs have tied rewards; "
            "the reward model does not separate responses"
        )
    pairs["length_prediction"], direction = length_predictions(train_rows, rows)
    length_vs_gold = baseline_accuracy(pairs["length_prediction"], np.sign(pairs["gold_gap"]))
    calibration = calibration_table(pairs["gap"].to_numpy(), cfg.calibration_bins)
    strength = strength_table(pairs, cfg.strength_bins)
    strength.attrs["strength_by"] = pairs.attrs.get("strength_by")

    stats = {
        "mean": float(np.mean(all_rewards)),
        "std": float(np.std(all_rewards)),
        "n": int(all_rewards.size),
        "source": f"held-out pairs {eval_path.name}: prompt + chosen and prompt + rejected",
    }
    write_json_atomic(run.reward_model_dir / STATS_FILE, stats)
    pairs.to_csv(run.reward_model_dir / EVAL_SCORES_FILE, index=False)

    summary = {
        "eval_accuracy": round(pairwise_accuracy(reward_chosen, reward_rejected), 4),
        "eval_accuracy_vs_gold": _mean_or_none(pairs["correct_vs_gold"].astype(float)),
        "length_baseline_accuracy": round(baseline_accuracy(pairs["length_prediction"], np.ones(len(pairs))), 4),
        "length_baseline_accuracy_vs_gold": None if length_vs_gold is None else round(length_vs_gold, 4),
        "length_baseline_direction": direction,
        "eval_loss": round(bt_loss(pairs["gap"].to_numpy()), 4),
        "eval_ties": int(pairs["tie"].sum()),
        "eval_ece": round(expected_calibration_error(calibration), 4),
        "eval_margin_mean": round(float(pairs["gap"].mean()), 4),
        "reward_mean": round(stats["mean"], 4),
        "reward_std": round(stats["std"], 4),
        "n_eval_pairs": len(pairs),
        "n_eval_pairs_gold_tied": int((pairs["gold_gap"] == 0).sum()),
        **_training_keys(run.reward_model_dir),
        "eval_seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(summary, indent=1))
    return EvalResult(summary=summary, pairs=pairs, calibration=calibration, strength=strength, stats=stats)
