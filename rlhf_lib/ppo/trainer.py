"""Stage 3: PPO on a language model against a reward model, built on ``accelerate``.

One readable loop (:meth:`PPOTrainer.train`) with numbered steps, in the style of CleanRL's ``ppo.py``::

    1 sample responses (pure sampling at temperature T)   6 GAE advantages, whitened over valid tokens
    2 truncate after the first EOS                         7 PPO epochs over shuffled minibatches
    3 reference log-probs                                  8 KL controller update
    4 reward-model scores (+ missing-EOS penalty)          9 log metrics (JSONL, progress bar, TB / W&B)
    5 policy log-probs + values, KL-shaped rewards        10 checkpoint

Implementation details follow Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (cited as "N+
details") and TRL's former PPOTrainer (TRL 1.12, ``trl/trainer/ppo_trainer.py``); each is named where it is used.
The pieces around the loop live beside it: tensor maths in :mod:`rlhf_lib.ppo.core` and :mod:`rlhf_lib.lm.logprobs`,
the models (value / reward heads, LoRA, precision) in :mod:`rlhf_lib.lm.policy_models`, sampling in
:mod:`rlhf_lib.lm.generation`, checkpoint files in :mod:`rlhf_lib.ppo.checkpoints`.

Speed-ups that are always on (exact: the same maths, fewer or cheaper operations, at most a different rounding):
- bf16 autocast with fp32 master weights; frozen Linear weights stored in bf16, bit-identical to autocast's cast.
- LoRA (``use_lora``): reference = the policy with its adapter off, reward = the value model with its adapter off.
- With one minibatch and one micro-batch, the rollout's policy/value forward keeps its autograd graph and serves
  as the first PPO step's forward (the parameters have not changed yet, so the outputs are the same).
- The LM head runs only on response positions, and responses are trimmed to the longest one.
- Log-probs and entropy in one row-chunked pass over the vocabulary (:mod:`rlhf_lib.lm.logprobs`).
- Responses from our own decode loop (:mod:`rlhf_lib.lm.generation`): one uniform draw per row, no ``generate``
  bookkeeping.
- Full-sequence forwards compute the prompt tokens all rows begin with (chat template, shared instruction) once
  (:mod:`rlhf_lib.lm.prefix`); on CPU they use eager (matmul) attention.

The two switches that remain (``torch_compile``, ``compile_generation``, at the end of :class:`PPOConfig`) trade
compile time for step time, so they pay only over long enough runs.

Public API for notebooks/03_ppo: :func:`train_ppo`, :func:`sample_table`
(curves: :func:`rlhf_lib.ppo.plots.plot_ppo_curves`);
tests and custom rewards use :class:`PPOTrainer` directly.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rlhf_lib.core import runtime
from rlhf_lib.core.config import CommonConfig, exact_div, to_dict
from rlhf_lib.lm import generation, models, sequences
from rlhf_lib.lm.logprobs import token_logprobs_and_entropy
from rlhf_lib.lm.policy_models import (
    RewardFn,
    ScalarHead,
    build_models,
    make_accelerator,
    prepare_model,
    response_logits,
    reward_model_source,
    should_compile,
)
from rlhf_lib.ppo import checkpoints
from rlhf_lib.ppo import core as ppo_core
from rlhf_lib.ppo.metrics import METRIC_GLOSSARY, JSONLWriter, MetricAccumulator, Reporter, read_jsonl
from rlhf_lib.ppo.rollout import PromptStream, Rollout, left_pad, load_prompts, sample_rows
from rlhf_lib.reward.combined import CombinedReward, check_reward, load_member_stack

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("linear", "cosine", "constant")
REPORT_TARGETS = ("tensorboard", "wandb")


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class PPOConfig(CommonConfig):
    """PPO stage: sample from the policy, score with the reward model, update with a KL leash to the reference."""

    # models
    reward_model: str = ""  # "": this run's reward_model/ folder (stage 2); or a model reference, whose score head is
    #   then random (benchmarks only)
    use_lora: bool = True  # train LoRA adapters on policy and value; the reference / reward model are then the
    #   adapter-off bases (one copy each)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (scale: lora_alpha / lora_r)
    lora_target_modules: list[str] = field(default_factory=list)  # modules that get adapters; []: peft's default for
    #   the architecture (q_proj, v_proj for Llama; c_attn for GPT-2); ["all-linear"]: every linear layer but the head
    trainable_top_layers: int = 0  # LoRA adapters only in the top N transformer blocks of policy and value (0: every
    #   block; as reward_model.trainable_top_layers); backward then stops at the lowest adapted block -- faster, but
    #   less capacity: a modelling choice, not a free speed-up
    # rollout
    total_episodes: int = 320  # prompts answered over the whole run (TRL name); updates: total_episodes / batch_size
    batch_size: int = 16  # prompts per update, all processes together (the rollout batch)
    response_length: int = 48  # maximum new tokens per response (TRL name)
    temperature: float = 0.7  # sampling temperature; log-probs use logits / temperature too (N+ details)
    local_rollout_forward_batch_size: int = 64  # rows per generation / no-grad forward chunk (memory knob, TRL name)
    missing_eos_penalty: float | None = None  # subtracted from the score of responses cut at response_length without
    #   EOS (TRL name); None: no penalty
    reward_normalization: bool = True  # standardise RM scores with the RM's reward_stats.json (mean / std) when present
    ensemble_reward: str = "model"  # the reward optimised: "model" (the saved reward model; an ensemble's WARM), or an
    #   ensemble's members combined, each standardised: mean, min (worst case) or uwo (mean - lambda * variance)
    # reward shaping and advantages
    kl_coef: float = 0.05  # KL penalty coefficient beta (initial value when adap_kl_ctrl is on)
    kl_estimator: str = "k1"  # per-token KL estimator: k1: log p - log q (unbiased), k3: low-variance, non-negative
    adap_kl_ctrl: bool = False  # adapt beta towards kl_target (Ziegler et al. 2019) instead of keeping it fixed
    kl_target: float = 6.0  # target of objective/kl (nats per sequence) for the adaptive controller
    kl_horizon: int = 10000  # adaptive controller horizon, in episodes
    gamma: float = 1.0  # discount factor
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = False  # whiten the per-token rewards (valid tokens) before GAE
    # optimisation
    num_ppo_epochs: int = 4  # passes over each rollout batch (TRL name)
    num_mini_batches: int = 1  # minibatches per PPO epoch, one optimiser step each (TRL name)
    gradient_accumulation_steps: int = 1  # micro-batches per minibatch: a memory knob, same maths (TRL name)
    learning_rate: float = 5.0e-4  # AdamW learning rate (LoRA scale; full fine-tuning wants ~1e-6 to 1e-5)
    lr_scheduler_type: str = "linear"  # linear, cosine or constant; linear / cosine decay to 0 over the run
    adam_epsilon: float = 1.0e-5  # AdamW epsilon (1e-5 as in the PPO implementation details)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # clip the global gradient norm of policy + value to this
    cliprange: float = 0.2  # PPO policy ratio clip epsilon
    cliprange_value: float = 0.2  # value prediction clip around the rollout values
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    # logging and checkpoints
    sample_every: int = 4  # write a table of sample completions every N updates (0: never)
    num_sample_rows: int = 4  # completions per sample table
    save_every: int = 4  # checkpoint every N updates (and at the end); older checkpoints keep only policy weights
    resume: bool = False  # continue from the latest checkpoint of this run instead of starting over
    report_to: list[str] = field(default_factory=list)  # extra loggers: "tensorboard" and/or "wandb"
    # speed: same maths up to floating-point rounding; compiling costs time once per process, repaid per update
    torch_compile: bool = False  # torch.compile each transformer block and the log-prob kernels for full-sequence
    #   passes (where a compiler is present: C++ on CPU, Triton on CUDA); pays from a few dozen updates on
    compile_generation: bool = False  # decode with one torch.compile'd step over a static KV cache; its compile is far
    #   longer than torch_compile's, so it pays only over runs of hundreds of updates

    def check(self) -> None:
        """Cross-field checks; raises ValueError naming the field and the fix."""
        for name in (
            "batch_size",
            "total_episodes",
            "response_length",
            "num_ppo_epochs",
            "num_mini_batches",
            "gradient_accumulation_steps",
            "local_rollout_forward_batch_size",
            "lora_r",
            "kl_horizon",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        check_reward(self.ensemble_reward, "ppo.ensemble_reward")
        if self.trainable_top_layers < 0:
            raise ValueError(f"trainable_top_layers must be >= 0 (0: every block), got {self.trainable_top_layers}")
        if self.trainable_top_layers and not self.use_lora:
            raise ValueError(
                "trainable_top_layers > 0 places LoRA adapters: set use_lora: true (or trainable_top_layers: 0)"
            )
        for name in ("temperature", "learning_rate", "kl_target", "max_grad_norm", "cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.sample_every < 0 or self.save_every < 0:
            raise ValueError("kl_coef, vf_coef, sample_every and save_every must be >= 0")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.kl_estimator not in ppo_core.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {ppo_core.KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {LR_SCHEDULES}, got {self.lr_scheduler_type!r}")
        bad = [t for t in self.report_to if t not in REPORT_TARGETS]
        if bad:
            raise ValueError(f"report_to: unknown {bad}; choose from {REPORT_TARGETS}")
        batch_plan(self, world_size=1)


@dataclass(frozen=True)
class BatchPlan:
    """Derived batch sizes (computed once, divisions checked)."""

    world_size: int
    local_batch: int  # rollout prompts per process per update
    mini_batch: int  # rows per optimiser step per process
    micro_batch: int  # rows per forward/backward per process
    num_updates: int


def batch_plan(cfg: PPOConfig, world_size: int) -> BatchPlan:
    """Split batch_size over processes, minibatches and micro-batches, refusing remainders."""
    local = exact_div(cfg.batch_size, world_size, f"batch_size ({cfg.batch_size}) over {world_size} processes")
    mini = exact_div(
        local,
        cfg.num_mini_batches,
        f"per-process batch ({local}) into num_mini_batches ({cfg.num_mini_batches}) minibatches",
    )
    micro = exact_div(
        mini,
        cfg.gradient_accumulation_steps,
        f"minibatch ({mini}) into gradient_accumulation_steps ({cfg.gradient_accumulation_steps})",
    )
    updates = exact_div(
        cfg.total_episodes,
        cfg.batch_size,
        f"total_episodes ({cfg.total_episodes}) into updates of batch_size ({cfg.batch_size})",
    )
    return BatchPlan(world_size, local, mini, micro, updates)


# ----------------------------------------------------------------------------------------------------------------
# the trainer


class NonFiniteError(RuntimeError):
    """A reward or loss became nan/inf; training stopped before the optimiser step."""


def check_models(tokenizer, policy: nn.Module, ref_policy: nn.Module | None) -> None:
    """Refuse a tokenizer or model set PPOTrainer cannot train correctly, naming the fix."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            "the tokenizer needs a pad token distinct from EOS (rlhf_lib.lm.models.load_tokenizer "
            "sets one); pad == eos hides the policy's own EOS from the masks"
        )
    if ref_policy is None and not models.is_peft(policy):
        raise ValueError("ref_policy=None needs a peft (LoRA) policy whose disabled adapter is the reference")


class PPOTrainer:
    """PPO for a causal LM policy with a value model, a frozen reference and a reward function.

    Models are used as given except for :func:`rlhf_lib.lm.policy_models.prepare_model` (dropout off, frozen Linear
    weights stored in the compute dtype, ...). ``ref_policy=None`` means the reference is the policy (a peft model)
    with its adapter disabled.
    """

    def __init__(
        self,
        cfg: PPOConfig,
        tokenizer,
        policy: nn.Module,
        ref_policy: nn.Module | None,
        value: ScalarHead,
        reward_fn: RewardFn,
        prompts: list[list[int]],
        ppo_dir: str | Path,
        checkpoints_dir: str | Path,
    ) -> None:
        cfg.check()
        check_models(tokenizer, policy, ref_policy)
        self.cfg, self.tokenizer, self.reward_fn = cfg, tokenizer, reward_fn
        device = runtime.pick_device(cfg.device)
        self.dtype = runtime.pick_dtype(cfg.dtype, device)
        self.accelerator = make_accelerator(device, self.dtype, cfg.gradient_accumulation_steps)
        self.device = self.accelerator.device
        self.plan = batch_plan(cfg, self.accelerator.num_processes)
        self.compiled = should_compile(cfg.torch_compile, self.device, "ppo.torch_compile")
        # exact only when the first PPO step sees the whole rollout batch in one forward
        self.reuse_forward = cfg.num_mini_batches == 1 and cfg.gradient_accumulation_steps == 1
        self.ref_policy = self._prepare_models(policy, ref_policy, value)
        # N+ details: pure sampling -- no top-k / top-p / min length, which would bias the KL estimate
        self.sampler = generation.ResponseSampler(
            policy,
            cfg.response_length,
            cfg.temperature,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            compile=should_compile(cfg.compile_generation, self.device, "ppo.compile_generation"),
            cache_dtype=None if self.dtype == torch.float32 else self.dtype,
        )
        self._prepare_optimisation(policy, value)
        self.kl_ctl = (
            ppo_core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.adap_kl_ctrl
            else ppo_core.FixedKLController(cfg.kl_coef)
        )
        self.stream = PromptStream(prompts, cfg.seed, self.accelerator.process_index, self.plan.world_size)
        self.ppo_dir, self.checkpoints_dir = Path(ppo_dir), Path(checkpoints_dir)
        self.metrics_writer = JSONLWriter(self.ppo_dir / "metrics.jsonl")
        self.samples_writer = JSONLWriter(self.ppo_dir / "samples.jsonl")
        self.update, self.episode = 0, 0
        self.last_good_checkpoint: Path | None = None
        self.last_row: dict[str, Any] = {}

    def _prepare_models(self, policy: nn.Module, ref_policy: nn.Module | None, value: ScalarHead) -> nn.Module | None:
        """Every model through prepare_model, the frozen ones onto the device; returns the reference (or None)."""
        reward_head = getattr(self.reward_fn, "head", None)
        for module in (policy, ref_policy, value, reward_head):
            if module is not None:
                prepare_model(module, self.dtype, self.device, self.compiled)
        if reward_head is not None:
            reward_head.to(self.device)
        if ref_policy is not None:
            ref_policy.requires_grad_(False).eval().to(self.device)
        return ref_policy

    def _prepare_optimisation(self, policy: nn.Module, value: ScalarHead) -> None:
        """One AdamW over policy + value (eps 1e-5, N+ details; TRL PPOTrainer) and its schedule, through accelerate."""
        from transformers import get_scheduler

        cfg = self.cfg
        params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
        if not params:
            raise ValueError("neither the policy nor the value model has trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        # TRL PPOTrainer: the schedule steps once per update and decays to 0 at the last one
        self.scheduler = get_scheduler(
            cfg.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=self.plan.num_updates
        )
        self.policy, self.value, self.optimizer = self.accelerator.prepare(policy, value, optimizer)
        # accelerate wraps a prepared model's forward in autocast plus a copy of every output to fp32. Every forward
        # here already runs inside accelerator.autocast(), and the log-prob pass upcasts the bf16 logits itself, so
        # the wrapper would only copy the (B, T, V) logits to fp32 at each policy forward and back in backward:
        # dropped (bit-identical results with the eager log-prob pass)
        for model in (self.policy, self.value):
            self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        self.trainable = params

    # -- helpers ---------------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _unwrapped_policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    def _any_process(self, flag: bool) -> bool:
        return self._gather(float(flag), "sum") > 0

    def _check_finite(self, what: str, tensor: Tensor, mask: Tensor | None = None) -> None:
        """Stop the run (keeping the last good checkpoint) when `tensor` holds nan/inf at valid positions."""
        values = tensor if mask is None else tensor[mask.bool()]
        bad = int((~torch.isfinite(values)).sum().item())
        if not self._any_process(bad > 0):
            return
        where = (
            f"the last good checkpoint is {self.last_good_checkpoint}; after fixing the cause, re-run with "
            f"resume: true to continue from it"
            if self.last_good_checkpoint
            else "no checkpoint was written yet (save_every controls how often)"
        )
        raise NonFiniteError(
            f"PPO update {self.update}: {what} is not finite ({bad} of {values.numel()} values are nan/inf); "
            f"training stopped before the optimiser step. {where}. Usual causes: a reward model or reward "
            f"function returning nan/inf, a learning_rate too high, or fp16 overflow (use bf16 or float32)."
        )

    def _rows(self, roll: Rollout, rows: Tensor | slice) -> tuple[Tensor, Tensor, Tensor]:
        return roll.query_responses[rows], roll.attention_mask[rows], roll.position_ids[rows]

    def _chunks(self, n: int) -> list[slice]:
        size = self.cfg.local_rollout_forward_batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _logprobs(self, logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probs (with grad) and entropy of `tokens` under logits / T; compiled kernels when compiling."""
        return token_logprobs_and_entropy(logits, tokens, self.cfg.temperature, fused=self.compiled)

    # -- rollout pieces ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, queries: Tensor, query_mask: Tensor) -> tuple[Tensor, int]:
        """Sampled responses (B, response_length), pad after a sequence stops; and the decoded step count."""
        policy = self._unwrapped_policy()
        pieces, steps = [], 0
        for rows in self._chunks(queries.shape[0]):
            with self.accelerator.autocast(), models.attention(policy, "sdpa"):
                response, chunk_steps = self.sampler(queries[rows], query_mask[rows])  # (b, response_length)
            steps = max(steps, chunk_steps)
            pieces.append(response)
        return torch.cat(pieces), steps

    def _sample_rollout(self) -> Rollout:
        """Steps 1 and 2: responses to the next batch of prompts, truncated after the first EOS (N+ details)."""
        queries, query_mask = left_pad(
            self.stream.next_batch(self.plan.local_batch), self.tokenizer.pad_token_id, self.device
        )
        raw_responses, gen_steps = self._generate(queries, query_mask)
        responses, response_mask, contains_eos = sequences.truncate_after_eos(
            raw_responses, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        )
        width = max(int(sequences.sequence_lengths(response_mask).max().item()), 1)  # columns padded in every row
        responses, response_mask = responses[:, :width], response_mask[:, :width]
        attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
        return Rollout(
            queries,
            responses,
            response_mask,
            contains_eos,
            torch.cat([queries, responses], dim=1),
            attention_mask,
            models.position_ids_from_mask(attention_mask),
            gen_steps,
        )

    @torch.no_grad()
    def _ref_logprobs(self, roll: Rollout) -> Tensor:
        out = []
        for rows in self._chunks(roll.queries.shape[0]):
            with self.accelerator.autocast():
                if self.ref_policy is None:  # LoRA: the reference is the policy with its adapter off
                    with self._unwrapped_policy().disable_adapter():
                        logits = response_logits(self._unwrapped_policy(), *self._rows(roll, rows), roll.context_length)
                else:
                    logits = response_logits(self.ref_policy, *self._rows(roll, rows), roll.context_length)
            out.append(self._logprobs(logits, roll.responses[rows])[0])
        return torch.cat(out)  # (B, T)

    @torch.no_grad()
    def _scores(self, roll: Rollout) -> Tensor:
        out = []
        for rows in self._chunks(roll.queries.shape[0]):
            with self.accelerator.autocast():
                out.append(self.reward_fn(*self._rows(roll, rows)[:2], roll.context_length).float())
        scores = torch.cat(out)  # (B,)
        self._check_finite("the reward score", scores)
        if self.cfg.missing_eos_penalty is not None:
            # TRL PPOTrainer `missing_eos_penalty`: responses cut at the length limit lose a fixed amount
            scores = scores - self.cfg.missing_eos_penalty * (~roll.contains_eos).float()
        return scores

    def _train_forward(self, roll: Rollout, rows: Tensor | slice) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probs (B, T) and values (B, T) with grad, and the mean entropy (detached) for `rows`."""
        ctx = roll.context_length
        with self.accelerator.autocast():
            logits = response_logits(self.policy, *self._rows(roll, rows), ctx)  # (b, T, V)
            values = self.value(*self._rows(roll, rows), ctx)[
                :, ctx - 1 : -1
            ]  # (b, T) value of the state before each token
        logprobs, entropy = self._logprobs(logits, roll.responses[rows])
        return logprobs, values.float(), ppo_core.masked_mean(entropy, roll.response_mask[rows])

    @torch.no_grad()
    def _rollout_forward_no_grad(self, roll: Rollout) -> tuple[Tensor, Tensor]:
        logprobs, values = [], []
        for rows in self._chunks(roll.queries.shape[0]):
            lp, v, _ = self._train_forward(roll, rows)
            logprobs.append(lp)
            values.append(v)
        return torch.cat(logprobs), torch.cat(values)

    def _score_rollout(self, roll: Rollout) -> tuple[Tensor, Tensor, Tensor] | None:
        """Steps 3 to 5: reference log-probs, scores, policy log-probs and values (with one minibatch, the policy
        forward keeps its graph for the first PPO step: returned, else None)."""
        # 3. reference log-probs of the sampled tokens, logits / T (N+ details)
        roll.ref_logprobs = self._ref_logprobs(roll)
        # 4. scores of query + truncated response at the last real token, minus the missing-EOS penalty
        roll.scores = self._scores(roll)
        # 5. policy log-probs and values
        if not self.reuse_forward:
            roll.logprobs, roll.values = self._rollout_forward_no_grad(roll)
            return None
        kept = self._train_forward(roll, slice(None))
        roll.logprobs, roll.values = kept[0].detach(), kept[1].detach()
        return kept

    def _advantages(self, roll: Rollout) -> None:
        """Steps 5 (rewards) and 6: KL-shaped per-token rewards, then GAE advantages and returns."""
        cfg, mask = self.cfg, roll.response_mask
        # -beta * KL per token, plus the score at the last token (Ziegler et al. 2019)
        roll.rewards, roll.non_score_reward, roll.kl = ppo_core.compute_rewards(
            roll.scores, roll.logprobs, roll.ref_logprobs, mask, self.kl_ctl.value, cfg.kl_estimator
        )
        self._check_finite("the per-token reward", roll.rewards, mask)
        if cfg.whiten_rewards:  # TRL PPOTrainer: whiten rewards without shifting their mean
            roll.rewards = ppo_core.masked_whiten(roll.rewards, mask, shift_mean=False)
        # GAE over valid tokens, then advantages whitened over valid tokens (N+ details)
        advantages, roll.returns = ppo_core.compute_gae(roll.rewards, roll.values, mask, cfg.gamma, cfg.lam)
        roll.advantages = ppo_core.masked_whiten(advantages, mask)

    # -- the loop ----------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Run PPO to the last update (or continue a checkpointed run); returns the stage summary."""
        from tqdm.auto import tqdm

        cfg, plan = self.cfg, self.plan
        start = self._resume() if cfg.resume else 0
        reporter = (
            Reporter(cfg.report_to, self.ppo_dir / "logs", Path(self.ppo_dir).parent.name, to_dict(cfg))
            if self.is_main
            else None
        )
        if self.is_main:
            logger.info(
                "PPO: %d updates x %d prompts, %s %s, LoRA=%s, compiled=%s, %d process(es)",
                plan.num_updates,
                cfg.batch_size,
                self.device,
                self.dtype,
                cfg.use_lora,
                self.compiled,
                plan.world_size,
            )
        bar = tqdm(total=plan.num_updates, initial=start, desc="PPO", disable=not self.is_main)
        session_start = time.perf_counter()
        self.policy.train()
        self.value.train()
        try:
            for update in range(start + 1, plan.num_updates + 1):
                self.update = update
                clock = [time.perf_counter()]
                roll = self._sample_rollout()  # 1-2. sample responses, truncate after the first EOS
                clock.append(time.perf_counter())
                kept = self._score_rollout(roll)  # 3-5. reference log-probs, scores, policy log-probs + values
                self._advantages(roll)  # 5-6. KL-shaped rewards, GAE advantages
                clock.append(time.perf_counter())
                lr = self.scheduler.get_last_lr()[0]
                stats = self._optimize(roll, kept)  # 7. PPO epochs over shuffled minibatches
                del kept
                self.scheduler.step()
                clock.append(time.perf_counter())
                # 8. KL controller: move beta towards the target using this batch's KL (Ziegler et al. 2019)
                self.kl_ctl.update(self._gather(roll.kl.sum(1).mean()), cfg.batch_size)
                # 9. log: TRL metric names, averaged over processes
                self.episode += cfg.batch_size
                self._log(roll, stats, lr, np.diff(clock).tolist() + [time.perf_counter() - clock[0]], reporter, bar)
                # 10. checkpoint every save_every updates and at the end
                if (cfg.save_every and update % cfg.save_every == 0) or update == plan.num_updates:
                    self._save_checkpoint()
        finally:
            bar.close()
            if reporter is not None:
                reporter.close()
        return self._summary((self.update - start) * cfg.batch_size, time.perf_counter() - session_start)

    def _optimize(self, roll: Rollout, kept: tuple[Tensor, Tensor, Tensor] | None) -> MetricAccumulator:
        """Step 7: num_ppo_epochs x num_mini_batches optimiser steps, each over gradient_accumulation micro-batches."""
        cfg, plan, acc = self.cfg, self.plan, self.accelerator
        stats = MetricAccumulator()
        for _epoch in range(cfg.num_ppo_epochs):
            order = torch.randperm(plan.local_batch, device=self.device)  # CleanRL: reshuffle every epoch
            for mb_start in range(0, plan.local_batch, plan.mini_batch):
                minibatch = order[mb_start : mb_start + plan.mini_batch]
                for mc_start in range(0, plan.mini_batch, plan.micro_batch):
                    rows = minibatch[mc_start : mc_start + plan.micro_batch]
                    with acc.accumulate(self.policy, self.value):
                        if kept is not None:  # first step: the rollout forward, reordered (same parameters)
                            forward, kept = (kept[0][rows], kept[1][rows], kept[2]), None
                        else:
                            forward = self._train_forward(roll, rows)
                        self._step(roll, rows, forward, stats)
        return stats

    def _step(
        self, roll: Rollout, rows: Tensor, forward: tuple[Tensor, Tensor, Tensor], stats: MetricAccumulator
    ) -> None:
        """One micro-batch: the PPO losses, backward, and (at a minibatch's end) clipping and the optimiser step."""
        cfg, acc, mask = self.cfg, self.accelerator, roll.response_mask[rows]
        new_logprobs, new_values, entropy = forward
        # Schulman et al. 2017 clipped surrogate; TRL/N+ details clipped value loss
        pg = ppo_core.policy_loss(new_logprobs, roll.logprobs[rows], roll.advantages[rows], mask, cfg.cliprange)
        vf = ppo_core.value_loss(new_values, roll.values[rows], roll.returns[rows], mask, cfg.cliprange_value)
        loss = pg["loss"] + cfg.vf_coef * vf["loss"]
        self._check_finite("the PPO loss", loss.detach())
        acc.backward(loss)
        if acc.sync_gradients:
            acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        for name, value in (
            ("policy/approxkl_avg", pg["approxkl"]),
            ("policy/clipfrac_avg", pg["clipfrac"]),
            ("loss/policy_avg", pg["loss"].detach()),
            ("loss/value_avg", vf["loss"].detach()),
            ("val/clipfrac_avg", vf["clipfrac"]),
            ("val/ratio", pg["ratio"]),
            ("policy/entropy_avg", entropy),
        ):
            stats.add(name, value)

    # -- logging -----------------------------------------------------------------------------------------------

    def _gather(self, value: Tensor | float, reduce: str = "mean") -> float:
        """A per-process scalar reduced over processes ("mean" or "sum")."""
        t = torch.as_tensor(value, dtype=torch.float32, device=self.device).reshape(1)
        if self.accelerator.num_processes == 1:
            return float(t)
        gathered = self.accelerator.gather(t)
        return float(gathered.sum() if reduce == "sum" else gathered.mean())

    def _log(self, roll: Rollout, stats: MetricAccumulator, lr: float, seconds: list[float], reporter, bar) -> None:
        """Step 9: the metrics row (every process), written, reported and shown by the main process."""
        row = self._metrics_row(roll, stats, lr, *seconds)
        if self.is_main:
            self.metrics_writer.write(row)
            reporter.log(row, self.episode)
            if self.cfg.sample_every and self.update % self.cfg.sample_every == 0:
                self.samples_writer.write_many(
                    sample_rows(roll, self.tokenizer, self.cfg.num_sample_rows, self.update, self.episode)
                )
            bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}")
            bar.update(1)
        self.last_row = row

    def _metrics_row(
        self,
        roll: Rollout,
        stats: MetricAccumulator,
        lr: float,
        t_gen: float,
        t_fwd: float,
        t_opt: float,
        t_total: float,
    ) -> dict[str, Any]:
        mask = roll.response_mask
        # TRL PPOTrainer: per-sequence sums averaged over the batch
        mean_kl = self._gather(roll.kl.sum(1).mean())
        mean_entropy = self._gather(torch.where(mask, -roll.logprobs, 0.0).sum(1).mean())
        mean_nsr = self._gather(roll.non_score_reward.sum(1).mean())
        mean_scores = self._gather(roll.scores.mean())
        row: dict[str, Any] = {
            "update": self.update,
            "episode": self.episode,
            "lr": lr,
            "objective/scores": mean_scores,
            "objective/kl": mean_kl,
            "objective/kl_coef": self.kl_ctl.value,
            "objective/entropy": mean_entropy,
            "objective/non_score_reward": mean_nsr,
            "objective/rlhf_reward": mean_scores + mean_nsr,
            "objective/response_length": self._gather(sequences.sequence_lengths(mask).float().mean()),
        }
        for name in (
            "policy/approxkl_avg",
            "policy/clipfrac_avg",
            "policy/entropy_avg",
            "loss/policy_avg",
            "loss/value_avg",
            "val/clipfrac_avg",
            "val/ratio",
        ):
            row[name] = self._gather(stats.mean(name))
        row["val/ratio_var"] = self._gather(stats.var("val/ratio"))
        row["val/num_eos_tokens"] = int(self._gather((roll.responses == self.tokenizer.eos_token_id).sum(), "sum"))
        row["episodes_per_s"] = self.cfg.batch_size / t_total
        row["tokens_per_s"] = self._gather(roll.queries.shape[0] * roll.gen_steps, "sum") / max(t_gen, 1e-9)
        row["time/generation"], row["time/forward"] = t_gen, t_fwd
        row["time/optimization"], row["time/update"] = t_opt, t_total
        row["memory/peak_rss_gib"] = peak_rss_gib()
        missing = set(row) - set(METRIC_GLOSSARY)
        assert not missing, f"metrics missing from METRIC_GLOSSARY: {missing}"
        return row

    def _summary(self, session_episodes: int, seconds: float) -> dict[str, Any]:
        """The stage summary: progress, this session's episodes/s, the last update's KL and scores."""
        last = self.last_row
        return {
            "updates": self.update,
            "episodes": self.episode,
            "episodes_per_s": session_episodes / seconds if seconds > 0 else float("nan"),
            "final_kl": last.get("objective/kl"),
            "final_scores": last.get("objective/scores"),
        }

    # -- checkpoints (files: rlhf_lib.ppo.checkpoints) -------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        """Step 10: checkpoints/update_XXXX with the full training state (older ones keep only the policy)."""
        cfg, acc = self.cfg, self.accelerator
        policy = self._unwrapped_policy()
        lora = (
            {
                "lora_r": cfg.lora_r,
                "lora_alpha": cfg.lora_alpha,
                "lora_target_modules": cfg.lora_target_modules,
                "trainable_top_layers": cfg.trainable_top_layers,
            }
            if models.is_peft(policy)
            else None
        )
        meta = {
            "update": self.update,
            "episode": self.episode,
            "model": cfg.model,
            "lora": lora,
            "frozen_dtype": "bfloat16" if self.dtype == torch.bfloat16 else "float32",
            "config": to_dict(cfg),
        }
        state = {
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "stream": self.stream.state_dict(),
            "update": self.update,
            "episode": self.episode,
            "accelerate_step": acc.step,
        }
        self.last_good_checkpoint = checkpoints.save_checkpoint(
            acc, self.checkpoints_dir, self.update, policy, acc.unwrap_model(self.value), self.optimizer, state, meta
        )

    def _resume(self) -> int:
        """Restore the latest full checkpoint; returns its update number (0 when there is none)."""
        folder = checkpoints.latest_checkpoint(self.checkpoints_dir)
        if folder is None:
            logger.warning("resume: no complete checkpoint under %s; starting from update 1", self.checkpoints_dir)
        else:
            state = checkpoints.load_checkpoint(
                self.accelerator,
                folder,
                self._unwrapped_policy(),
                self.accelerator.unwrap_model(self.value),
                self.optimizer,
            )
            self.scheduler.load_state_dict(state["scheduler"])
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.stream.load_state_dict(state["stream"])
            self.update, self.episode = state["update"], state["episode"]
            self.accelerator.step = state["accelerate_step"]
            self.last_good_checkpoint = folder
            logger.info("resumed from %s (update %d)", folder, self.update)
        if self.is_main:  # drop rows logged after the checkpoint: those updates run again
            self.metrics_writer.truncate_after(self.update)
            self.samples_writer.truncate_after(self.update)
            rows = read_jsonl(self.metrics_writer.path)
            self.last_row = rows[-1] if rows else {}
        return self.update

    # -- export ------------------------------------------------------------------------------------------------

    def save_policy(self, out_dir: str | Path) -> Path:
        """The trained policy in Hugging Face format (LoRA merged, fp32) + tokenizer; ends training.

        Loads with ``transformers.pipeline("text-generation", model=out_dir)``.
        """
        out_dir = Path(out_dir)
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return out_dir
        return checkpoints.export_policy(
            self.accelerator.unwrap_model(self.policy, keep_fp32_wrapper=False), self.tokenizer, out_dir
        )


def peak_rss_gib() -> float:
    """Peak resident set size of this process in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------------------------
# notebook API


@dataclass
class PPOResult:
    """What :func:`train_ppo` returns: the summary.json entry, the metrics table, and where the policy is."""

    summary: dict[str, Any]
    metrics: Any  # pandas.DataFrame, one row per update
    policy_dir: Path


def metrics_frame(run_or_dir) -> Any:
    """metrics.jsonl of a run (or a ppo folder) as a DataFrame, one row per update."""
    import pandas as pd

    folder = Path(getattr(run_or_dir, "ppo_dir", run_or_dir))
    return pd.DataFrame(read_jsonl(folder / "metrics.jsonl"))


def train_ppo(cfg: PPOConfig, run) -> PPOResult:
    """Train the policy of ``cfg.model`` against this run's reward model on its PPO prompts; save the policy."""
    prompts = load_prompts(run.upstream("data").data_dir / "ppo_prompts.jsonl")
    tokenizer = models.load_tokenizer(cfg.model)
    reward_ref, stats = reward_model_source(cfg, run)
    built = build_models(cfg, tokenizer, reward_ref, stats)
    if cfg.ensemble_reward != "model":  # the ensemble's members combined, already in standard units
        stack, _ = load_member_stack(reward_ref, cfg.ensemble_reward, "cpu", tokenizer)
        built.reward_fn = CombinedReward(stack)
        print(f"[ppo] reward: {stack.k} reward models combined by {cfg.ensemble_reward} ({reward_ref})")
    trainer = PPOTrainer(
        cfg,
        tokenizer,
        built.policy,
        built.ref_policy,
        built.value,
        built.reward_fn,
        prompts,
        run.ppo_dir,
        run.checkpoints_dir,
    )
    summary = trainer.train()
    trainer.save_policy(run.policy_dir)
    return PPOResult(summary, metrics_frame(run), run.policy_dir)


def sample_table(run) -> Any:
    """The sample completions logged every sample_every updates, as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(read_jsonl(Path(run.ppo_dir) / "samples.jsonl"))
