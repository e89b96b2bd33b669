"""Stage 3: PPO on a language model against a reward model, built on ``accelerate``.

One readable loop (:meth:`PPOTrainer.train`) with numbered steps, in the style of CleanRL's ``ppo.py``::

    1 sample responses (pure sampling at temperature T)   6 GAE advantages, whitened over valid tokens
    2 truncate after the first EOS                         7 PPO epochs over shuffled minibatches
    3 reference log-probs                                  8 KL controller update
    4 reward-model scores (+ missing-EOS penalty)          9 log metrics (JSONL, progress bar, TB / W&B)
    5 policy log-probs + values, KL-shaped rewards        10 checkpoint

The tensor maths lives in :mod:`rlhf_lib.ppo_core`. Implementation details follow Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO" (cited as "N+ details") and TRL's former PPOTrainer (TRL 1.12,
``trl/trainer/ppo_trainer.py``); each is named where it is used.

Speed levers (issue 6), all exact (same maths, fewer or cheaper operations):
- bf16 autocast with fp32 master weights; *frozen* Linear weights are stored in bf16, which is bit-identical to
  autocast's own cast but saves memory and the per-decode-step re-cast (autocast caches casts of trainable
  weights only).
- LoRA (``use_lora``): the reference is the policy with its adapter disabled and the reward model is the value
  model with its adapter disabled, so one copy of each base is held.
- With one minibatch and one micro-batch, the rollout's policy/value forward keeps its autograd graph and serves
  as the first PPO step's forward (the parameters have not changed yet, so the outputs are the same).
- The LM head runs only on response positions (``logits_to_keep``), and responses are trimmed to the longest one.
- Log-probs and entropy come from one fused, row-chunked pass over the vocabulary (:func:`token_logprobs_and_entropy`)
  instead of several full (B, T, V) fp32 temporaries; with ``fused_logprobs`` as two compiled kernels. The LM head
  runs on exactly the response positions, so its gradient is not a zero-filled slice of a wider one.
- Responses come from our own decode loop (:mod:`rlhf_lib.generation`): one uniform draw per row instead of one
  per vocabulary entry, no ``generate`` bookkeeping, and optionally (``compile_generation``) one compiled decode
  step over a static KV cache, whose attention runs as fused reductions (:func:`generation.decode_attention`).
- With ``share_prompt_prefix``, full-sequence forwards compute the prompt tokens every row begins with (chat
  template, shared instruction) once: one packed row, the prefix and then each sequence's suffix, whose attention
  puts the prefix's keys in front of every suffix's (:mod:`rlhf_lib.prefix`).
- On CPU, full-sequence forwards use eager (matmul) attention -- bf16 SDPA's backward is ~5x slower there -- while
  generation keeps SDPA for the prompt prefill and eager decode steps.
- Frozen weights get their own memory instead of viewing the memory-mapped safetensors file, so the file pages
  read while casting do not stay resident.

Public API for notebooks/03_ppo: :func:`train_ppo`, :func:`sample_table` (curves: :func:`rlhf_lib.plots.plot_ppo_curves`),
:func:`load_policy_checkpoint`; tests and custom rewards use :class:`PPOTrainer` directly.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from . import generation, models, ppo_core, prefix, runtime
from .config import CommonConfig, exact_div, to_dict
from .metrics import METRIC_GLOSSARY, JSONLWriter, MetricAccumulator, Reporter, read_jsonl
from .models import attention, set_attention

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("linear", "cosine", "constant")
REPORT_TARGETS = ("tensorboard", "wandb")
CHECKPOINT_PREFIX = "update_"


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class PPOConfig(CommonConfig):
    """PPO stage: sample from the policy, score with the reward model, update with a KL leash to the reference."""

    # models
    reward_model: str = ""  # "": this run's reward_model/ folder (stage 2); or a model reference, whose score head is then random (benchmarks only)
    use_lora: bool = True  # train LoRA adapters on policy and value; the reference / reward model are then the adapter-off bases (one copy each)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (scale: lora_alpha / lora_r)
    lora_target_modules: list[str] = field(default_factory=list)  # modules that get adapters; []: peft's default for the architecture (q_proj, v_proj for Llama; c_attn for GPT-2); ["all-linear"]: every linear layer but the head
    trainable_top_layers: int = 0  # LoRA adapters only in the top N transformer blocks of policy and value (0: every block; as reward_model.trainable_top_layers); backward then stops at the lowest adapted block (SmolLM2, 15 of 30: policy forward + backward 1.65 -> 0.94 s) -- less capacity: a modelling choice, not a free speed-up
    # rollout
    total_episodes: int = 320  # prompts answered over the whole run (TRL name); updates: total_episodes / batch_size
    batch_size: int = 16  # prompts per update, all processes together (the rollout batch)
    response_length: int = 48  # maximum new tokens per response (TRL name)
    temperature: float = 0.7  # sampling temperature; log-probs use logits / temperature too (N+ details)
    local_rollout_forward_batch_size: int = 64  # rows per generation / no-grad forward chunk (memory knob, TRL name)
    missing_eos_penalty: float | None = None  # subtracted from the score of responses cut at response_length without EOS (TRL name); None: no penalty
    reward_normalization: bool = True  # standardise RM scores with the RM's reward_stats.json (mean / std) when present
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
    reuse_rollout_forward: bool = True  # with 1 minibatch and 1 micro-batch, the rollout forward doubles as the first PPO step's (exact speed-up)
    torch_compile: bool = False  # torch.compile each transformer block for full-sequence forwards (~1.5x faster on CPU after ~1 min of compiling; generation stays eager)
    fused_logprobs: bool = False  # log-probs/entropy over the vocabulary as two torch.compile'd kernels (~2x faster than the chunked eager pass after ~20 s of compiling; changes fp32 rounding)
    compile_generation: bool = False  # sample with one torch.compile'd decode step over a static KV cache (~1.3x faster decoding on CPU after ~2.5 min of compiling: for long runs)
    share_prompt_prefix: bool = False  # full-sequence forwards compute the prompt tokens all rows begin with once, not per row (same maths up to rounding; pays when prompts share a system prompt / instruction: rlhf_lib.prefix)
    # logging and checkpoints
    sample_every: int = 4  # write a table of sample completions every N updates (0: never)
    num_sample_rows: int = 4  # completions per sample table
    save_every: int = 4  # checkpoint every N updates (and at the end); older checkpoints keep only policy weights
    resume: bool = False  # continue from the latest checkpoint of this run instead of starting over
    report_to: list[str] = field(default_factory=list)  # extra loggers: "tensorboard" and/or "wandb"

    def check(self) -> None:
        """Cross-field checks; raises ValueError naming the field and the fix."""
        for name in ("batch_size", "total_episodes", "response_length", "num_ppo_epochs", "num_mini_batches",
                     "gradient_accumulation_steps", "local_rollout_forward_batch_size", "lora_r", "kl_horizon"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.trainable_top_layers < 0:
            raise ValueError(f"trainable_top_layers must be >= 0 (0: every block), got {self.trainable_top_layers}")
        if self.trainable_top_layers and not self.use_lora:
            raise ValueError("trainable_top_layers > 0 places LoRA adapters: set use_lora: true (or trainable_top_layers: 0)")
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
    mini = exact_div(local, cfg.num_mini_batches,
                     f"per-process batch ({local}) into num_mini_batches ({cfg.num_mini_batches}) minibatches")
    micro = exact_div(mini, cfg.gradient_accumulation_steps,
                      f"minibatch ({mini}) into gradient_accumulation_steps ({cfg.gradient_accumulation_steps})")
    updates = exact_div(cfg.total_episodes, cfg.batch_size,
                        f"total_episodes ({cfg.total_episodes}) into updates of batch_size ({cfg.batch_size})")
    return BatchPlan(world_size, local, mini, micro, updates)


# ----------------------------------------------------------------------------------------------------------------
# prompts


def load_prompts(path: str | Path) -> list[list[int]]:
    """Token ids of each prompt in a ``ppo_prompts.jsonl`` (field ``prompt_ids``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the data stage (notebooks/01_data_prep) first")
    prompts: list[list[int]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            ids = row.get("prompt_ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{path} line {line_no}: 'prompt_ids' must be a non-empty list of token ids; "
                                 "re-run the data stage to regenerate the file")
            prompts.append(ids)
    if not prompts:
        raise ValueError(f"{path} holds no prompts; re-run the data stage")
    return prompts


def left_pad(seqs: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (ids, mask), both (B, P): generation appends on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


class PromptStream:
    """An endless, reproducible stream of prompts: a fresh seeded shuffle per pass; state = (pass, position)."""

    def __init__(self, prompts: list[list[int]], seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.prompts, self.seed, self.rank, self.world_size = prompts, seed, rank, world_size
        self.data_epoch, self.position = 0, 0

    def _order(self, data_epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, data_epoch]).permutation(len(self.prompts))

    def next_batch(self, local_batch: int) -> list[list[int]]:
        """This process's share of the next global batch (every process advances by the global batch)."""
        picked: list[int] = []
        order = self._order(self.data_epoch)
        while len(picked) < local_batch * self.world_size:
            if self.position == len(order):
                self.data_epoch, self.position = self.data_epoch + 1, 0
                order = self._order(self.data_epoch)
            picked.append(int(order[self.position]))
            self.position += 1
        mine = picked[self.rank * local_batch:(self.rank + 1) * local_batch]
        return [self.prompts[i] for i in mine]

    def state_dict(self) -> dict[str, int]:
        return {"data_epoch": self.data_epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.data_epoch, self.position = int(state["data_epoch"]), int(state["position"])


# ----------------------------------------------------------------------------------------------------------------
# models


class RewardFn(Protocol):
    """Scores query+response sequences: (query_responses (B, L), attention_mask (B, L), context_length) -> (B,)."""

    def __call__(self, query_responses: Tensor, attention_mask: Tensor, context_length: int) -> Tensor: ...


class ScalarHead(nn.Module):
    """Per-position scalars of a sequence-classification model: its backbone + score head at every token.

    Used as the value model (initialised from the reward model, TRL PPOTrainer / N+ details) and, read at the last
    real token, as the reward model.
    """

    def __init__(self, model: nn.Module, share_prompt_prefix: bool = False) -> None:
        super().__init__()
        self.model = model  # a transformers *ForSequenceClassification, possibly wrapped by peft
        self.share_prompt_prefix = share_prompt_prefix  # see PPOConfig.share_prompt_prefix

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                context_length: int | None = None) -> Tensor:
        """(B, L) scalars; with `context_length` (the prompt width) and ``share_prompt_prefix``, a prefix all
        prompts share is computed once (its columns then hold 0: only response-side values are read)."""
        base = models.peft_base(self.model)
        backbone = getattr(base, base.base_model_prefix)
        if not hasattr(base, "score"):
            raise TypeError(f"{type(base).__name__} has no `score` head; value/reward models must be "
                            "AutoModelForSequenceClassification models with num_labels=1")
        layout = (prefix.find_shared_prefix(input_ids, attention_mask, position_ids, context_length)
                  if self.share_prompt_prefix and context_length is not None else None)
        if layout is None:
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, L, H)
            return base.score(hidden).squeeze(-1).float()  # (B, L)
        with attention(self.model, prefix.ATTENTION):
            hidden = backbone(**layout.model_inputs(), use_cache=False).last_hidden_state  # (1, P + B * S, H)
        return layout.unpack(base.score(hidden).squeeze(-1).float(), input_ids.shape[1])  # (B, L)


def scores_at_last_token(head: ScalarHead, input_ids: Tensor, attention_mask: Tensor,
                         context_length: int | None = None) -> Tensor:
    """Score of each sequence read at its last real token, whatever the padding side (B,)."""
    values = head(input_ids, attention_mask, models.position_ids_from_mask(attention_mask), context_length)  # (B, L)
    last = ppo_core.last_valid_index(attention_mask)  # (B,)
    return values.gather(1, last[:, None]).squeeze(1)  # (B,)


class ModelReward:
    """RM-backed RewardFn: score at the last real token of query + truncated response, optionally standardised."""

    def __init__(self, head: ScalarHead, mean: float = 0.0, std: float = 1.0, adapter_off: bool = False) -> None:
        if std <= 0 or not math.isfinite(std):
            raise ValueError(f"reward std must be a positive number, got {std}")
        self.head, self.mean, self.std, self.adapter_off = head, float(mean), float(std), adapter_off

    def __call__(self, query_responses: Tensor, attention_mask: Tensor, context_length: int) -> Tensor:
        # with LoRA the reward model is the value model with its adapter (and trained value head) disabled
        adapter = self.head.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()
        with torch.no_grad(), adapter:
            scores = scores_at_last_token(self.head, query_responses, attention_mask, context_length)  # (B,)
        return (scores - self.mean) / self.std


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T) at `tokens` and the entropy; only the log-normaliser is saved for backward.

    Same maths as ppo_core.logprobs_from_logits / entropy_from_logits (fp32, logits / T) without (B, T, V) fp32
    temporaries: eager in row chunks that stay in cache (:func:`_chunked_logprobs`), or ``fused`` as two compiled
    kernels (:func:`_logprobs_entropy_lse`, :func:`_logprobs_grad`). On CPU the full-vocabulary passes were ~40 % of
    a policy forward/backward before either.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, chunk: int,  # type: ignore[override]
                fused: bool):
        if fused:
            logprobs, entropy, lse = _compiled("logprobs")(logits, tokens, temperature)
        else:
            logprobs, entropy, lse = _chunked_logprobs(logits, tokens, temperature, chunk)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk, ctx.fused = temperature, chunk, fused
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, _grad_entropy: Tensor):  # type: ignore[override]
        logits, tokens, lse = ctx.saved_tensors
        if ctx.fused:
            grad = _compiled("logprobs_grad")(logits, tokens, lse, grad_logprobs, ctx.temperature)
        else:
            grad = _chunked_grad(logits, tokens, lse, grad_logprobs, ctx.temperature, ctx.chunk)
        return grad, None, None, None, None


def _chunked_logprobs(logits: Tensor, tokens: Tensor, temperature: float,
                      chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Eager forward of :class:`_TokenLogprobs`: (log-probs, entropy, log-normaliser), each (B, T) fp32."""
    B, T, _ = logits.shape
    logprobs = logits.new_empty((B, T), dtype=torch.float32)
    entropy = torch.empty_like(logprobs)
    lse = torch.empty_like(logprobs)
    for b in range(B):
        for t in range(0, T, chunk):
            z = logits[b, t:t + chunk].float() / temperature  # (c, V)
            norm = torch.logsumexp(z, dim=-1)  # (c,)
            picked = z.gather(-1, tokens[b, t:t + chunk, None]).squeeze(-1)  # (c,)
            logprobs[b, t:t + chunk] = picked - norm
            # TRL entropy_from_logits: H = logsumexp(z) - sum(softmax(z) * z)
            entropy[b, t:t + chunk] = norm - (torch.exp(z - norm[:, None]) * z).sum(-1)
            lse[b, t:t + chunk] = norm
    return logprobs, entropy, lse


def _chunked_grad(logits: Tensor, tokens: Tensor, lse: Tensor, grad_logprobs: Tensor, temperature: float,
                  chunk: int) -> Tensor:
    """Eager backward of :class:`_TokenLogprobs`: the gradient w.r.t. the logits, (B, T, V) in their dtype."""
    grad = torch.empty_like(logits)
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(0, T, chunk):
            z = logits[b, t:t + chunk].float() / temperature  # (c, V)
            g = grad_logprobs[b, t:t + chunk, None].float()  # (c, 1)
            # d logp_k / d z = onehot(k) - softmax(z)
            grad_z = torch.exp(z - lse[b, t:t + chunk, None]).mul_(-g)
            grad_z.scatter_add_(-1, tokens[b, t:t + chunk, None], g)
            grad[b, t:t + chunk] = (grad_z / temperature).to(logits.dtype)
    return grad


def _logprobs_entropy_lse(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """The forward maths of :class:`_TokenLogprobs` on the whole (B, T, V) tensor, written for ``torch.compile``.

    Compiled, each row's vocabulary is read from the bf16 logits inside one fused loop (max, then sum exp and sum
    exp * z): no fp32 (B, T, V) temporary is materialised and the ~8 eager passes per chunk become ~2.
    """
    z = logits.float() / temperature  # (B, T, V)
    lse = torch.logsumexp(z, dim=-1)  # (B, T)
    picked = z.gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
    entropy = lse - (torch.exp(z - lse[..., None]) * z).sum(-1)  # TRL entropy_from_logits
    return picked - lse, entropy, lse


def _logprobs_grad(logits: Tensor, tokens: Tensor, lse: Tensor, grad_logprobs: Tensor, temperature: float) -> Tensor:
    """d(sum g * logp) / d logits = g * (onehot(token) - softmax(z)) / T, one fused elementwise pass when compiled."""
    z = logits.float() / temperature  # (B, T, V)
    onehot = torch.arange(logits.shape[-1], device=logits.device) == tokens[..., None]  # (B, T, V) bool, never stored
    g = grad_logprobs.float()[..., None]  # (B, T, 1)
    return ((onehot.float() - torch.exp(z - lse[..., None])) * g / temperature).to(logits.dtype)


_COMPILED: dict[str, Any] = {}


def _compiled(name: str):
    """torch.compile'd fused log-prob kernels, built on first use (symbolic sizes: one graph for every B and T)."""
    if name not in _COMPILED:
        fn = {"logprobs": _logprobs_entropy_lse, "logprobs_grad": _logprobs_grad}[name]
        _COMPILED[name] = models.compile_dynamic(fn)
    return _COMPILED[name]


def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float, chunk: int = 16,
                               fused: bool = False) -> tuple[Tensor, Tensor]:
    """(log-probs (B, T) with grad, entropy (B, T) detached) of `tokens` under softmax(logits / temperature).

    ``fused=True`` runs the maths as two ``torch.compile``d kernels (forward, backward) instead of eager row chunks:
    the same values to fp32 rounding, about twice as fast on CPU once compiled (~20 s, once per process; batch 8 x 48
    tokens of SmolLM2: forward 43 -> 22 ms, backward 53 -> 30 ms).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _TokenLogprobs.apply(logits, tokens.long(), float(temperature), chunk, fused)


@dataclass
class PPOModels:
    """The four roles. ``ref_policy`` None = the policy with its LoRA adapter disabled."""

    policy: nn.Module
    ref_policy: nn.Module | None
    value: ScalarHead
    reward_fn: RewardFn


def lora_config(cfg: PPOConfig, task_type: str, model: nn.Module):
    """peft LoraConfig from the stage config for `model` (dropout 0: RLHF runs with dropout off, N+ details)."""
    from peft import LoraConfig

    targets: Any = list(cfg.lora_target_modules) or None  # None: peft's per-architecture default
    extra: dict[str, Any] = {"modules_to_save": ["score"]} if task_type == "SEQ_CLS" else {}
    top = models.top_block_indices(model, cfg.trainable_top_layers)
    if top is not None:
        extra["layers_to_transform"] = top
        if targets == ["all-linear"]:  # peft takes the string form only without layers_to_transform
            targets = models.linear_layer_names(model)
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(task_type=task_type, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=targets, **extra)


def build_models(cfg: PPOConfig, tokenizer, reward_model: str, reward_stats: dict[str, float] | None) -> PPOModels:
    """Policy (trainable), reference (frozen), value (from the RM, trainable) and reward (frozen RM)."""
    policy = models.load_causal_lm(cfg.model, tokenizer)
    rm = models.load_sequence_classifier(reward_model, tokenizer)
    mean, std = (reward_stats["mean"], reward_stats["std"]) if reward_stats else (0.0, 1.0)
    if cfg.use_lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(cfg, "CAUSAL_LM", policy))
        value = ScalarHead(get_peft_model(rm, lora_config(cfg, "SEQ_CLS", rm)), cfg.share_prompt_prefix)
        return PPOModels(policy, None, value, ModelReward(value, mean, std, adapter_off=True))
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    value = ScalarHead(copy.deepcopy(rm), cfg.share_prompt_prefix)
    reward_head = ScalarHead(rm.requires_grad_(False).eval(), cfg.share_prompt_prefix)
    return PPOModels(policy, ref, value, ModelReward(reward_head, mean, std))


def store_frozen_weights_in(model: nn.Module | None, dtype: torch.dtype) -> None:
    """Store frozen Linear weights in the autocast dtype: bit-identical maths, half the memory, no re-cast.

    Autocast casts fp32 weights to bf16 at every call and caches the cast only for trainable weights, so a
    frozen model would be re-cast at each decode step. A frozen output head tied to the (fp32) input embedding
    gets its own bf16 copy, leaving the embedding -- and so the residual stream -- in fp32 as autocast would.
    """
    if model is None or dtype == torch.float32:
        return
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if get_emb is not None else None
    tied = emb.weight if emb is not None else None
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.requires_grad:
            continue
        if module.weight is tied:
            module.weight = nn.Parameter(tied.detach().to(dtype), requires_grad=False)
        elif module.weight.dtype != dtype:
            module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None and not module.bias.requires_grad and module.bias.dtype != dtype:
            module.bias.data = module.bias.data.to(dtype)
    # transformers maps safetensors files into memory; the pages read by the casts above stay resident while any
    # tensor (embeddings, norms) still views the mapping, so give the remaining frozen tensors their own memory
    for param in model.parameters():
        if not param.requires_grad and param.dtype != dtype:
            param.data = param.data.clone()


def use_eager_attention(model: nn.Module) -> None:
    """Matmul attention for full-sequence forwards: on CPU, bf16 SDPA's backward is ~5x slower (torch 2.13)."""
    set_attention(model, "eager")


def _round_frozen_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Round frozen Linear weights through `dtype` and back (reproduces the base a bf16 run trained against)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype).float()


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by name (all weights for full fine-tuning; adapters + value head for LoRA)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load `trainable_state` output back, refusing partial matches."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = names - set(state), set(state) - names
    if missing or unexpected:
        raise ValueError(f"{what}: checkpoint does not match the model (missing {sorted(missing)[:3]}..., "
                         f"unexpected {sorted(unexpected)[:3]}...); was it written with other model/LoRA settings?")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].dtype))


def load_policy_checkpoint(path: str | Path, cfg: CommonConfig, tokenizer=None) -> nn.Module:
    """The policy of a checkpoint folder (``checkpoints/update_XXXX``) as a plain fp32 causal LM (LoRA merged).

    Any stage config works (only ``cfg.model`` is read, for the tokenizer); the base model and LoRA settings come
    from the checkpoint's meta.json.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "policy.safetensors").exists():
        raise FileNotFoundError(f"{path} holds no policy.safetensors; checkpoints live in <run>/checkpoints/update_XXXX")
    meta = json.loads((path / "meta.json").read_text())
    tokenizer = tokenizer or models.load_tokenizer(cfg.model)
    model = models.load_causal_lm(meta["model"], tokenizer)
    if meta["lora"] is not None:
        from peft import get_peft_model

        lcfg = PPOConfig(model=meta["model"], use_lora=True, **meta["lora"])
        model = get_peft_model(model, lora_config(lcfg, "CAUSAL_LM", model))
        if meta.get("frozen_dtype") == "bfloat16":
            _round_frozen_linears(model, torch.bfloat16)
    load_trainable_state(model, load_file(str(path / "policy.safetensors")), f"{path}/policy.safetensors")
    if meta["lora"] is not None:
        model = model.merge_and_unload()
    return model.eval()


def make_accelerator(device: torch.device, dtype: torch.dtype, gradient_accumulation_steps: int):
    """An Accelerator with bf16 autocast or none; on CPU cpu=True.

    accelerate keeps one process-wide state; in a single process (a notebook kernel, the test suite) a run with
    another precision resets it instead of refusing.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    mixed_precision = "bf16" if dtype == torch.bfloat16 else "no"
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu",
                       gradient_accumulation_steps=gradient_accumulation_steps)


# ----------------------------------------------------------------------------------------------------------------
# the trainer


class NonFiniteError(RuntimeError):
    """A reward or loss became nan/inf; training stopped before the optimiser step."""


@dataclass
class Rollout:
    """One update's experience, per process. B = local batch, P = query width, T = response width."""

    queries: Tensor  # (B, P) left-padded prompt ids
    responses: Tensor  # (B, T) truncated after the first EOS, pad after it
    response_mask: Tensor  # (B, T) bool, True up to and including the first EOS
    contains_eos: Tensor  # (B,) bool
    query_responses: Tensor  # (B, P + T)
    attention_mask: Tensor  # (B, P + T)
    position_ids: Tensor  # (B, P + T)
    gen_steps: int  # decoded steps before truncation
    scores: Tensor | None = None  # (B,)
    logprobs: Tensor | None = None  # (B, T) rollout policy log-probs (temperature-scaled)
    ref_logprobs: Tensor | None = None  # (B, T)
    values: Tensor | None = None  # (B, T)
    rewards: Tensor | None = None  # (B, T)
    non_score_reward: Tensor | None = None  # (B, T)
    kl: Tensor | None = None  # (B, T)
    advantages: Tensor | None = None  # (B, T)
    returns: Tensor | None = None  # (B, T)

    @property
    def context_length(self) -> int:
        return self.queries.shape[1]


class PPOTrainer:
    """PPO for a causal LM policy with a value model, a frozen reference and a reward function.

    Models are used as given except that dropout is switched off and frozen Linear weights are stored in the
    compute dtype (see :func:`store_frozen_weights_in`). ``ref_policy=None`` means the reference is the policy
    (a peft model) with its adapter disabled.
    """

    def __init__(self, cfg: PPOConfig, tokenizer, policy: nn.Module, ref_policy: nn.Module | None,
                 value: ScalarHead, reward_fn: RewardFn, prompts: list[list[int]], ppo_dir: str | Path,
                 checkpoints_dir: str | Path) -> None:
        from transformers import get_scheduler

        cfg.check()
        self.cfg, self.tokenizer = cfg, tokenizer
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer needs a pad token distinct from EOS (rlhf_lib.models.load_tokenizer "
                             "sets one); pad == eos hides the policy's own EOS from the masks")
        if ref_policy is None and not models.is_peft(policy):
            raise ValueError("ref_policy=None needs a peft (LoRA) policy whose disabled adapter is the reference")
        device = runtime.pick_device(cfg.device)
        self.dtype = runtime.pick_dtype(cfg.dtype, device)
        self.accelerator = make_accelerator(device, self.dtype, cfg.gradient_accumulation_steps)
        self.device = self.accelerator.device
        self.plan = batch_plan(cfg, self.accelerator.num_processes)
        # exact only when the first PPO step sees the whole rollout batch in one forward
        self.reuse_forward = (cfg.reuse_rollout_forward and cfg.num_mini_batches == 1
                              and cfg.gradient_accumulation_steps == 1)
        self.reward_fn = reward_fn

        for module in (policy, ref_policy, value, getattr(reward_fn, "head", None)):
            if module is not None:
                module = module.model if isinstance(module, ScalarHead) else module
                models.disable_dropout(module)  # N+ details: dropout off in every model
                store_frozen_weights_in(module, self.dtype)
                if self.device.type == "cpu":
                    use_eager_attention(module)
                if cfg.torch_compile:
                    models.compile_blocks(module)  # one compiled graph per mode, shared by every block
        reward_head = getattr(reward_fn, "head", None)
        if reward_head is not None:
            reward_head.to(self.device)
        if ref_policy is not None:
            ref_policy.requires_grad_(False).eval().to(self.device)
        self.ref_policy = ref_policy
        # N+ details: pure sampling -- no top-k / top-p / min length, which would bias the KL estimate
        self.sampler = generation.ResponseSampler(
            policy, cfg.response_length, cfg.temperature, tokenizer.eos_token_id, tokenizer.pad_token_id,
            compile=cfg.compile_generation, cache_dtype=None if self.dtype == torch.float32 else self.dtype)

        params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
        if not params:
            raise ValueError("neither the policy nor the value model has trainable parameters")
        # one AdamW over policy + value, eps 1e-5 (N+ details; TRL PPOTrainer)
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=cfg.adam_epsilon,
                                      weight_decay=cfg.weight_decay)
        # TRL PPOTrainer: the schedule steps once per update and decays to 0 at the last one
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=0,
                                       num_training_steps=self.plan.num_updates)
        self.policy, self.value, self.optimizer = self.accelerator.prepare(policy, value, optimizer)
        # accelerate wraps a prepared model's forward in autocast plus a copy of every output to fp32. Every forward
        # here already runs inside accelerator.autocast(), and the log-prob pass upcasts the bf16 logits itself, so
        # the wrapper only copied the (B, T, V) logits to fp32 at each policy forward and back to bf16 in backward
        # (~65 + ~31 ms for 8 x 48 tokens of SmolLM2, and twice the logits' memory). Dropped: bit-identical results
        # with the eager log-prob pass; fused_logprobs' compiled kernel now reads bf16 (fp32 rounding may differ)
        for model in (self.policy, self.value):
            self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        self.trainable = params

        self.kl_ctl = (ppo_core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                       if cfg.adap_kl_ctrl else ppo_core.FixedKLController(cfg.kl_coef))
        self.stream = PromptStream(prompts, cfg.seed, self.accelerator.process_index, self.plan.world_size)
        self.ppo_dir, self.checkpoints_dir = Path(ppo_dir), Path(checkpoints_dir)
        self.metrics_writer = JSONLWriter(self.ppo_dir / "metrics.jsonl")
        self.samples_writer = JSONLWriter(self.ppo_dir / "samples.jsonl")
        self.update, self.episode = 0, 0
        self.last_good_checkpoint: Path | None = None
        self.last_row: dict[str, Any] = {}

    # -- helpers ---------------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _unwrapped_policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.gather(torch.tensor([float(flag)], device=self.device)).sum().item() > 0)

    def _check_finite(self, what: str, tensor: Tensor, mask: Tensor | None = None) -> None:
        """Stop the run (keeping the last good checkpoint) when `tensor` holds nan/inf at valid positions."""
        values = tensor if mask is None else tensor[mask.bool()]
        bad = int((~torch.isfinite(values)).sum().item())
        if not self._any_process(bad > 0):
            return
        where = (f"the last good checkpoint is {self.last_good_checkpoint}; after fixing the cause, re-run with "
                 f"resume: true to continue from it" if self.last_good_checkpoint else
                 "no checkpoint was written yet (save_every controls how often)")
        raise NonFiniteError(
            f"PPO update {self.update}: {what} is not finite ({bad} of {values.numel()} values are nan/inf); "
            f"training stopped before the optimiser step. {where}. Usual causes: a reward model or reward "
            f"function returning nan/inf, a learning_rate too high, or fp16 overflow (use bf16 or float32)."
        )

    def _policy_forward(self, model: nn.Module, query_responses: Tensor, attention_mask: Tensor,
                        position_ids: Tensor, context_length: int) -> Tensor:
        """Logits predicting each response token, (B, T, V); the LM head runs on those T positions only.

        Position context_length - 1 predicts response token 0. The positions are passed as a tensor rather than
        keeping T + 1 and slicing the last one off: backward through a slice would zero-fill and copy a whole
        (B, T + 1, V) gradient.
        """
        keep = torch.arange(context_length - 1, query_responses.shape[1] - 1, device=query_responses.device)  # (T,)
        layout = (prefix.find_shared_prefix(query_responses, attention_mask, position_ids, context_length)
                  if self.cfg.share_prompt_prefix else None)
        if layout is None:
            return model(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids,
                         logits_to_keep=keep, use_cache=False).logits
        with attention(model, prefix.ATTENTION):  # the shared prompt prefix once (rlhf_lib.prefix)
            logits = model(**layout.model_inputs(), logits_to_keep=layout.suffix_columns(keep),
                           use_cache=False).logits  # (1, B * T, V): the LM head on the response positions only
        return logits.view(layout.batch, keep.shape[0], -1)  # (B, T, V)

    def _rows(self, roll: Rollout, rows: Tensor | slice) -> tuple[Tensor, Tensor, Tensor]:
        return roll.query_responses[rows], roll.attention_mask[rows], roll.position_ids[rows]

    def _chunks(self, n: int) -> list[slice]:
        size = self.cfg.local_rollout_forward_batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    # -- rollout pieces ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, queries: Tensor, query_mask: Tensor) -> tuple[Tensor, int]:
        """Sampled responses (B, response_length), pad after a sequence stops; and the decoded step count."""
        policy = self._unwrapped_policy()
        pieces, steps = [], 0
        for rows in self._chunks(queries.shape[0]):
            with self.accelerator.autocast(), attention(policy, "sdpa"):
                response, chunk_steps = self.sampler(queries[rows], query_mask[rows])  # (b, response_length)
            steps = max(steps, chunk_steps)
            pieces.append(response)
        return torch.cat(pieces), steps

    @torch.no_grad()
    def _ref_logprobs(self, roll: Rollout) -> Tensor:
        out = []
        for rows in self._chunks(roll.queries.shape[0]):
            with self.accelerator.autocast():
                if self.ref_policy is None:  # LoRA: the reference is the policy with its adapter off
                    with self._unwrapped_policy().disable_adapter():
                        logits = self._policy_forward(self._unwrapped_policy(), *self._rows(roll, rows),
                                                      roll.context_length)
                else:
                    logits = self._policy_forward(self.ref_policy, *self._rows(roll, rows), roll.context_length)
            out.append(token_logprobs_and_entropy(logits, roll.responses[rows], self.cfg.temperature,
                                                  fused=self.cfg.fused_logprobs)[0])
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
            logits = self._policy_forward(self.policy, *self._rows(roll, rows), ctx)  # (b, T, V)
            values = self.value(*self._rows(roll, rows), ctx)[:, ctx - 1:-1]  # (b, T) value of the state before each token
        logprobs, entropy = token_logprobs_and_entropy(logits, roll.responses[rows], self.cfg.temperature,
                                                       fused=self.cfg.fused_logprobs)
        return logprobs, values.float(), ppo_core.masked_mean(entropy, roll.response_mask[rows])

    @torch.no_grad()
    def _rollout_forward_no_grad(self, roll: Rollout) -> tuple[Tensor, Tensor]:
        logprobs, values = [], []
        for rows in self._chunks(roll.queries.shape[0]):
            lp, v, _ = self._train_forward(roll, rows)
            logprobs.append(lp)
            values.append(v)
        return torch.cat(logprobs), torch.cat(values)

    # -- the loop ----------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Run PPO to the last update (or continue a checkpointed run); returns the stage summary."""
        cfg, plan = self.cfg, self.plan
        start = self._resume() if cfg.resume else 0
        reporter = Reporter(cfg.report_to, self.ppo_dir / "logs", Path(self.ppo_dir).parent.name,
                            to_dict(cfg)) if self.is_main else None
        if self.is_main:
            logger.info("PPO: %d updates x %d prompts, %s %s, LoRA=%s, reuse_forward=%s, %d process(es)",
                        plan.num_updates, cfg.batch_size, self.device, self.dtype, cfg.use_lora,
                        self.reuse_forward, plan.world_size)
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.num_updates, initial=start, desc="PPO", disable=not self.is_main)
        session_start, session_episodes = time.perf_counter(), 0
        self.policy.train()
        self.value.train()
        try:
            for update in range(start + 1, plan.num_updates + 1):
                self.update = update
                t_update = time.perf_counter()

                # 1. rollout: sample responses to a batch of prompts from the current policy
                queries, query_mask = left_pad(self.stream.next_batch(plan.local_batch),
                                               self.tokenizer.pad_token_id, self.device)
                t0 = time.perf_counter()
                raw_responses, gen_steps = self._generate(queries, query_mask)
                t_gen = time.perf_counter() - t0

                # 2. truncate after the first EOS (N+ details); trim columns that are padding in every row
                responses, response_mask, contains_eos = ppo_core.truncate_after_eos(
                    raw_responses, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
                width = max(int(ppo_core.sequence_lengths(response_mask).max().item()), 1)
                responses, response_mask = responses[:, :width], response_mask[:, :width]
                attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
                roll = Rollout(queries, responses, response_mask, contains_eos,
                               torch.cat([queries, responses], dim=1), attention_mask,
                               models.position_ids_from_mask(attention_mask), gen_steps)

                t0 = time.perf_counter()
                # 3. reference log-probs of the sampled tokens, logits / T (N+ details)
                roll.ref_logprobs = self._ref_logprobs(roll)
                # 4. scores of query + truncated response at the last real token, minus the missing-EOS penalty
                roll.scores = self._scores(roll)
                # 5. policy log-probs and values; with one minibatch the graph is kept for the first PPO step
                if self.reuse_forward:
                    kept = self._train_forward(roll, slice(None))
                    roll.logprobs, roll.values = kept[0].detach(), kept[1].detach()
                else:
                    kept = None
                    roll.logprobs, roll.values = self._rollout_forward_no_grad(roll)
                t_fwd = time.perf_counter() - t0

                #    KL-shaped per-token rewards: -beta * KL, plus the score at the last token (Ziegler et al.)
                roll.rewards, roll.non_score_reward, roll.kl = ppo_core.compute_rewards(
                    roll.scores, roll.logprobs, roll.ref_logprobs, response_mask, self.kl_ctl.value,
                    cfg.kl_estimator)
                self._check_finite("the per-token reward", roll.rewards, response_mask)
                if cfg.whiten_rewards:  # TRL PPOTrainer: whiten rewards without shifting their mean
                    roll.rewards = ppo_core.masked_whiten(roll.rewards, response_mask, shift_mean=False)

                # 6. advantages: GAE over valid tokens, then whitened over valid tokens (N+ details)
                advantages, roll.returns = ppo_core.compute_gae(roll.rewards, roll.values, response_mask,
                                                                cfg.gamma, cfg.lam)
                roll.advantages = ppo_core.masked_whiten(advantages, response_mask)

                # 7. PPO epochs over shuffled minibatches, gradient accumulation inside each
                t0 = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                stats = self._optimize(roll, kept)
                t_opt = time.perf_counter() - t0
                del kept
                self.scheduler.step()

                # 8. KL controller: move beta towards the target using this batch's KL (Ziegler et al. 2019)
                mean_kl = self._gather_mean(roll.kl.sum(1).mean())
                self.kl_ctl.update(mean_kl, cfg.batch_size)

                # 9. log: TRL metric names, averaged over processes
                self.episode += cfg.batch_size
                t_total = time.perf_counter() - t_update
                session_episodes += cfg.batch_size
                row = self._metrics_row(roll, stats, lr, t_gen, t_fwd, t_opt, t_total)
                if self.is_main:
                    self.metrics_writer.write(row)
                    reporter.log(row, self.episode)
                    if cfg.sample_every and update % cfg.sample_every == 0:
                        self.samples_writer.write_many(self._sample_rows(roll))
                    bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}")
                    bar.update(1)
                self.last_row = row

                # 10. checkpoint every save_every updates and at the end
                if (cfg.save_every and update % cfg.save_every == 0) or update == plan.num_updates:
                    self._save_checkpoint()
        finally:
            bar.close()
            if reporter is not None:
                reporter.close()
        seconds = time.perf_counter() - session_start
        last = self.last_row
        return {
            "updates": self.update,
            "episodes": self.episode,
            "episodes_per_s": session_episodes / seconds if seconds > 0 else float("nan"),
            "final_kl": last.get("objective/kl"),
            "final_scores": last.get("objective/scores"),
        }

    def _optimize(self, roll: Rollout, kept: tuple[Tensor, Tensor, Tensor] | None) -> MetricAccumulator:
        """Step 7: num_ppo_epochs x num_mini_batches optimiser steps, each over gradient_accumulation micro-batches."""
        cfg, plan, acc = self.cfg, self.plan, self.accelerator
        stats = MetricAccumulator()
        mask = roll.response_mask
        for _epoch in range(cfg.num_ppo_epochs):
            order = torch.randperm(plan.local_batch, device=self.device)  # CleanRL: reshuffle every epoch
            for mb_start in range(0, plan.local_batch, plan.mini_batch):
                minibatch = order[mb_start:mb_start + plan.mini_batch]
                for mc_start in range(0, plan.mini_batch, plan.micro_batch):
                    rows = minibatch[mc_start:mc_start + plan.micro_batch]
                    with acc.accumulate(self.policy, self.value):
                        if kept is not None:  # first step: the rollout forward, reordered (same parameters)
                            new_logprobs, new_values, entropy = kept[0][rows], kept[1][rows], kept[2]
                            kept = None
                        else:
                            new_logprobs, new_values, entropy = self._train_forward(roll, rows)
                        # Schulman et al. 2017 clipped surrogate; TRL/N+ details clipped value loss
                        pg = ppo_core.policy_loss(new_logprobs, roll.logprobs[rows], roll.advantages[rows],
                                                  mask[rows], cfg.cliprange)
                        vf = ppo_core.value_loss(new_values, roll.values[rows], roll.returns[rows], mask[rows],
                                                 cfg.cliprange_value)
                        loss = pg["loss"] + cfg.vf_coef * vf["loss"]
                        self._check_finite("the PPO loss", loss.detach())
                        acc.backward(loss)
                        if acc.sync_gradients:
                            acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    for name, value in (("policy/approxkl_avg", pg["approxkl"]), ("policy/clipfrac_avg",
                                        pg["clipfrac"]), ("loss/policy_avg", pg["loss"].detach()),
                                        ("loss/value_avg", vf["loss"].detach()), ("val/clipfrac_avg",
                                        vf["clipfrac"]), ("val/ratio", pg["ratio"]),
                                        ("policy/entropy_avg", entropy)):
                        stats.add(name, value)
        return stats

    # -- logging -----------------------------------------------------------------------------------------------

    def _gather_mean(self, value: Tensor | float) -> float:
        t = torch.as_tensor(value, dtype=torch.float32, device=self.device).reshape(1)
        return float(self.accelerator.gather(t).mean().item()) if self.accelerator.num_processes > 1 else float(t)

    def _gather_sum(self, value: Tensor | float) -> float:
        t = torch.as_tensor(value, dtype=torch.float32, device=self.device).reshape(1)
        return float(self.accelerator.gather(t).sum().item()) if self.accelerator.num_processes > 1 else float(t)

    def _metrics_row(self, roll: Rollout, stats: MetricAccumulator, lr: float, t_gen: float, t_fwd: float,
                     t_opt: float, t_total: float) -> dict[str, Any]:
        mask = roll.response_mask
        # TRL PPOTrainer: per-sequence sums averaged over the batch
        mean_kl = self._gather_mean(roll.kl.sum(1).mean())
        mean_entropy = self._gather_mean(torch.where(mask, -roll.logprobs, 0.0).sum(1).mean())
        mean_nsr = self._gather_mean(roll.non_score_reward.sum(1).mean())
        mean_scores = self._gather_mean(roll.scores.mean())
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
            "objective/response_length": self._gather_mean(ppo_core.sequence_lengths(mask).float().mean()),
        }
        for name in ("policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg",
                     "loss/value_avg", "val/clipfrac_avg", "val/ratio"):
            row[name] = self._gather_mean(stats.mean(name))
        row["val/ratio_var"] = self._gather_mean(stats.var("val/ratio"))
        row["val/num_eos_tokens"] = int(self._gather_sum((roll.responses == self.tokenizer.eos_token_id).sum()))
        row["episodes_per_s"] = self.cfg.batch_size / t_total
        row["tokens_per_s"] = self._gather_sum(roll.queries.shape[0] * roll.gen_steps) / max(t_gen, 1e-9)
        row["time/generation"], row["time/forward"] = t_gen, t_fwd
        row["time/optimization"], row["time/update"] = t_opt, t_total
        row["memory/peak_rss_gib"] = peak_rss_gib()
        missing = set(row) - set(METRIC_GLOSSARY)
        assert not missing, f"metrics missing from METRIC_GLOSSARY: {missing}"
        return row

    def _sample_rows(self, roll: Rollout) -> list[dict[str, Any]]:
        """A few (query, response, score) rows for the sample table."""
        n = min(self.cfg.num_sample_rows, roll.queries.shape[0])
        rows = []
        for i in range(n):
            query = roll.queries[i][roll.attention_mask[i, :roll.context_length].bool()]
            response = roll.responses[i][roll.response_mask[i]]
            rows.append({
                "update": self.update, "episode": self.episode,
                "query": self.tokenizer.decode(query, skip_special_tokens=True),
                "response": self.tokenizer.decode(response, skip_special_tokens=True),
                "score": float(roll.scores[i]), "kl": float(roll.kl[i].sum()),
                "length": int(roll.response_mask[i].sum()), "eos": bool(roll.contains_eos[i]),
            })
        return rows

    # -- checkpoints -------------------------------------------------------------------------------------------

    def _checkpoint_meta(self) -> dict[str, Any]:
        cfg = self.cfg
        lora = ({"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_target_modules": cfg.lora_target_modules,
                 "trainable_top_layers": cfg.trainable_top_layers}
                if models.is_peft(self._unwrapped_policy()) else None)
        return {"update": self.update, "episode": self.episode, "model": cfg.model, "lora": lora,
                "frozen_dtype": "bfloat16" if self.dtype == torch.bfloat16 else "float32",
                "config": to_dict(cfg)}

    def _save_checkpoint(self) -> None:
        """Write checkpoints/update_XXXX atomically; older checkpoints keep only their policy weights."""
        from safetensors.torch import save_file

        acc = self.accelerator
        final = self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{self.update:04d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.is_main:
            save_file(trainable_state(self._unwrapped_policy()), str(tmp / "policy.safetensors"))
            save_file(trainable_state(acc.unwrap_model(self.value)), str(tmp / "value.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({
                "scheduler": self.scheduler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                "stream": self.stream.state_dict(), "update": self.update, "episode": self.episode,
                "accelerate_step": acc.step,
            }, tmp / "trainer_state.pt")
            (tmp / "meta.json").write_text(json.dumps(self._checkpoint_meta(), indent=2, default=str))
        torch.save(rng_state(), tmp / f"rng_{acc.process_index}.pt")  # every process: its own sampling RNG
        acc.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}[0-9]*")):
                if old != final and old.is_dir():
                    for extra in old.iterdir():  # keep policy weights for the over-optimisation curve
                        if extra.name not in ("policy.safetensors", "meta.json"):
                            extra.unlink()
        acc.wait_for_everyone()
        self.last_good_checkpoint = final

    def _resume(self) -> int:
        """Restore the latest full checkpoint; returns its update number (0 when there is none)."""
        from safetensors.torch import load_file

        ckpt = latest_checkpoint(self.checkpoints_dir)
        if ckpt is None:
            logger.warning("resume: no complete checkpoint under %s; starting from update 1", self.checkpoints_dir)
            self.metrics_writer.truncate_after(0) if self.is_main else None
            self.samples_writer.truncate_after(0) if self.is_main else None
            return 0
        load_trainable_state(self._unwrapped_policy(), load_file(str(ckpt / "policy.safetensors")),
                             f"{ckpt}/policy.safetensors")
        load_trainable_state(self.accelerator.unwrap_model(self.value), load_file(str(ckpt / "value.safetensors")),
                             f"{ckpt}/value.safetensors")
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.device,
                                                  weights_only=False))
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.stream.load_state_dict(state["stream"])
        self.update, self.episode = state["update"], state["episode"]
        self.accelerator.step = state["accelerate_step"]
        rng_file = ckpt / f"rng_{self.accelerator.process_index}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        if self.is_main:
            self.metrics_writer.truncate_after(self.update)
            self.samples_writer.truncate_after(self.update)
            rows = read_jsonl(self.metrics_writer.path)
            self.last_row = rows[-1] if rows else {}
        self.last_good_checkpoint = ckpt
        logger.info("resumed from %s (update %d)", ckpt, self.update)
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
        model = self.accelerator.unwrap_model(self.policy, keep_fp32_wrapper=False)
        model = model.float()  # frozen weights were stored in bf16: merge LoRA in fp32
        if models.is_peft(model):
            model = model.merge_and_unload()
        if getattr(model.config, "tie_word_embeddings", False):  # undo the bf16 copy of a frozen tied head
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir


# ----------------------------------------------------------------------------------------------------------------
# process-level helpers


def peak_rss_gib() -> float:
    """Peak resident set size of this process in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest checkpoint folder holding full training state (None when there is none)."""
    folders = sorted(Path(checkpoints_dir).glob(f"{CHECKPOINT_PREFIX}[0-9][0-9][0-9][0-9]"))
    full = [f for f in folders if (f / "trainer_state.pt").exists()]
    return full[-1] if full else None


def policy_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """(update, folder) of every checkpoint with policy weights, oldest first (for the over-optimisation curve)."""
    out = []
    for folder in sorted(Path(checkpoints_dir).glob(f"{CHECKPOINT_PREFIX}[0-9][0-9][0-9][0-9]")):
        if (folder / "policy.safetensors").exists():
            out.append((int(folder.name[len(CHECKPOINT_PREFIX):]), folder))
    return out


# ----------------------------------------------------------------------------------------------------------------
# notebook API


@dataclass
class PPOResult:
    """What :func:`train_ppo` returns: the summary.json entry, the metrics table, and where the policy is."""

    summary: dict[str, Any]
    metrics: Any  # pandas.DataFrame, one row per update
    policy_dir: Path


def reward_model_source(cfg: PPOConfig, run) -> tuple[str, dict[str, float] | None]:
    """The reward model reference and its normalisation statistics (None = no normalisation)."""
    ref = cfg.reward_model or str(run.upstream("reward_model").reward_model_dir)
    if not cfg.reward_model and not (Path(ref) / "config.json").exists():
        raise FileNotFoundError(f"{ref} holds no reward model: run the reward_model stage first, or set "
                                "reward_model to a model reference (random score head; benchmarks only)")
    stats_path = Path(ref) / "reward_stats.json"
    if not cfg.reward_normalization or not stats_path.exists():
        if cfg.reward_normalization:
            logger.info("no %s: reward scores are used unnormalised", stats_path)
        return ref, None
    stats = json.loads(stats_path.read_text())
    return ref, {"mean": float(stats["mean"]), "std": float(stats["std"])}


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
    trainer = PPOTrainer(cfg, tokenizer, built.policy, built.ref_policy, built.value, built.reward_fn, prompts,
                         run.ppo_dir, run.checkpoints_dir)
    summary = trainer.train()
    trainer.save_policy(run.policy_dir)
    return PPOResult(summary, metrics_frame(run), run.policy_dir)


def sample_table(run) -> Any:
    """The sample completions logged every sample_every updates, as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(read_jsonl(Path(run.ppo_dir) / "samples.jsonl"))
