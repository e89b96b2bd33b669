"""The models PPO trains and scores with: value / reward heads, LoRA, precision and attention plumbing.

- :class:`ScalarHead` turns a sequence classifier into per-token values (the value model) or, read at the last real
  token, reward scores (:class:`ModelReward`).
- :func:`build_models` builds the four roles. With LoRA the reference is the policy with its adapter disabled and
  the reward model is the value model with its adapter disabled, so one copy of each base is held.
- :func:`prepare_model` is what the trainer does to every model: dropout off (N+ details), frozen Linear weights
  stored in the autocast dtype (:func:`store_frozen_weights_in`), eager attention for CPU full-sequence forwards,
  compiled transformer blocks where a compiler is present (:func:`compiler_available`).
- :func:`response_logits` is the policy forward of PPO: the LM head on the response positions only, and the prompt
  prefix all rows share computed once (:mod:`rlhf_lib.lm.prefix`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rlhf_lib.core import runtime
from rlhf_lib.lm import models, prefix, sequences

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    """Scores query+response sequences: (query_responses (B, L), attention_mask (B, L), context_length) -> (B,)."""

    def __call__(self, query_responses: Tensor, attention_mask: Tensor, context_length: int) -> Tensor: ...


class ScalarHead(nn.Module):
    """Per-position scalars of a sequence-classification model: its backbone + score head at every token.

    Used as the value model (initialised from the reward model, TRL PPOTrainer / N+ details) and, read at the last
    real token, as the reward model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # a transformers *ForSequenceClassification, possibly wrapped by peft

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, context_length: int | None = None
    ) -> Tensor:
        """(B, L) scalars. Given `context_length` (the prompt width), a prompt prefix all rows share is computed
        once (:mod:`rlhf_lib.lm.prefix`); its columns then hold 0, as only response-side values are read."""
        base = models.peft_base(self.model)
        backbone = getattr(base, base.base_model_prefix)
        if not hasattr(base, "score"):
            raise TypeError(
                f"{type(base).__name__} has no `score` head; value/reward models must be "
                "AutoModelForSequenceClassification models with num_labels=1"
            )
        layout = (
            prefix.find_shared_prefix(input_ids, attention_mask, position_ids, context_length)
            if context_length is not None
            else None
        )
        if layout is None:
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (B, L, H)
            return base.score(hidden).squeeze(-1).float()  # (B, L)
        with models.attention(self.model, prefix.ATTENTION):
            hidden = backbone(**layout.model_inputs(), use_cache=False).last_hidden_state  # (1, P + B * S, H)
        return layout.unpack(base.score(hidden).squeeze(-1).float(), input_ids.shape[1])  # (B, L)


def scores_at_last_token(
    head: ScalarHead, input_ids: Tensor, attention_mask: Tensor, context_length: int | None = None
) -> Tensor:
    """Score of each sequence read at its last real token, whatever the padding side (B,)."""
    values = head(input_ids, attention_mask, models.position_ids_from_mask(attention_mask), context_length)  # (B, L)
    last = sequences.last_valid_index(attention_mask)  # (B,)
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


def response_logits(
    model: nn.Module,
    query_responses: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    context_length: int,
    share_prefix: bool = True,
) -> Tensor:
    """Logits predicting each response token, (B, T, V); the LM head runs on those T positions only.

    Position context_length - 1 predicts response token 0. The positions are passed as a tensor rather than
    keeping T + 1 and slicing the last one off: backward through a slice would zero-fill and copy a whole
    (B, T + 1, V) gradient. ``share_prefix``: compute the prompt prefix all rows share once (:mod:`rlhf_lib.lm.prefix`;
    same maths as the padded batch up to rounding, used whenever the rows share at least a few tokens).
    """
    keep = torch.arange(context_length - 1, query_responses.shape[1] - 1, device=query_responses.device)  # (T,)
    layout = (
        prefix.find_shared_prefix(query_responses, attention_mask, position_ids, context_length)
        if share_prefix
        else None
    )
    if layout is None:
        return model(
            input_ids=query_responses,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep,
            use_cache=False,
        ).logits
    with models.attention(model, prefix.ATTENTION):
        logits = model(
            **layout.model_inputs(), logits_to_keep=layout.suffix_columns(keep), use_cache=False
        ).logits  # (1, B * T, V): the LM head on the response positions only
    return logits.view(layout.batch, keep.shape[0], -1)  # (B, T, V)


# ----------------------------------------------------------------------------------------------------------------
# building the four roles


@dataclass
class PPOModels:
    """The four roles. ``ref_policy`` None = the policy with its LoRA adapter disabled."""

    policy: nn.Module
    ref_policy: nn.Module | None
    value: ScalarHead
    reward_fn: RewardFn


def lora_config(settings: Any, task_type: str, model: nn.Module):
    """peft LoraConfig for `model` (dropout 0: RLHF runs with dropout off, N+ details).

    `settings`: anything with ``lora_r``, ``lora_alpha``, ``lora_target_modules`` and ``trainable_top_layers`` -- a
    PPOConfig, or the ``lora`` entry of a checkpoint's meta.json as a namespace.
    """
    from peft import LoraConfig

    targets: Any = list(settings.lora_target_modules) or None  # None: peft's per-architecture default
    extra: dict[str, Any] = {"modules_to_save": ["score"]} if task_type == "SEQ_CLS" else {}
    top = models.top_block_indices(model, settings.trainable_top_layers)
    if top is not None:
        extra["layers_to_transform"] = top
        if targets == ["all-linear"]:  # peft takes the string form only without layers_to_transform
            targets = models.linear_layer_names(model)
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        task_type=task_type,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        **extra,
    )


def build_models(cfg: Any, tokenizer, reward_model: str, reward_stats: dict[str, float] | None) -> PPOModels:
    """Policy (trainable), reference (frozen), value (from the RM, trainable) and reward (frozen RM) for a PPOConfig."""
    policy = models.load_causal_lm(cfg.model, tokenizer)
    rm = models.load_sequence_classifier(reward_model, tokenizer)
    mean, std = (reward_stats["mean"], reward_stats["std"]) if reward_stats else (0.0, 1.0)
    if cfg.use_lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(cfg, "CAUSAL_LM", policy))
        value = ScalarHead(get_peft_model(rm, lora_config(cfg, "SEQ_CLS", rm)))
        return PPOModels(policy, None, value, ModelReward(value, mean, std, adapter_off=True))
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    value = ScalarHead(copy.deepcopy(rm))
    reward_head = ScalarHead(rm.requires_grad_(False).eval())
    return PPOModels(policy, ref, value, ModelReward(reward_head, mean, std))


def reward_model_source(cfg, run) -> tuple[str, dict[str, float] | None]:
    """The reward model reference and its normalisation statistics (None = no normalisation)."""
    ref = cfg.reward_model or str(run.upstream("reward_model").reward_model_dir)  # the base run's with common.base_run
    if not cfg.reward_model and not (Path(ref) / "config.json").exists():
        raise FileNotFoundError(
            f"{ref} holds no reward model: run the reward_model stage first, or set "
            "reward_model to a model reference (random score head; benchmarks only)"
        )
    stats_path = Path(ref) / "reward_stats.json"
    if not cfg.reward_normalization or not stats_path.exists():
        if cfg.reward_normalization:
            logger.info("no %s: reward scores are used unnormalised", stats_path)
        return ref, None
    stats = json.loads(stats_path.read_text())
    return ref, {"mean": float(stats["mean"]), "std": float(stats["std"])}


# ----------------------------------------------------------------------------------------------------------------
# precision, attention, compiling


def compiler_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can generate code here: a C++ compiler for CPU kernels, Triton for CUDA ones."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 -- inductor raises several kinds when no compiler is found
        return False
    return True


def should_compile(requested: bool, device: torch.device, what: str) -> bool:
    """`requested` (a ``torch_compile`` setting) where a compiler is present; else False, with a log line."""
    device = torch.device(device)
    if requested and not compiler_available(device):
        logger.warning(
            "%s: no compiler for torch.compile on %s (a C++ compiler on CPU, Triton on CUDA); running "
            "eager, with the same maths",
            what,
            device.type,
        )
        return False
    return requested


def prepare_model(module: nn.Module, dtype: torch.dtype, device: torch.device, compile_blocks: bool) -> None:
    """What the trainer does to each model it is given: dropout off (N+ details), frozen weights in the compute
    dtype, eager attention for CPU full-sequence forwards, and optionally compiled transformer blocks."""
    module = module.model if isinstance(module, ScalarHead) else module
    models.disable_dropout(module)
    store_frozen_weights_in(module, dtype)
    if device.type == "cpu":
        use_eager_attention(module)
    if compile_blocks:
        models.compile_blocks(module)  # one compiled graph per mode, shared by every block


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
    """Matmul attention for full-sequence forwards: on CPU, bf16 SDPA's backward is much slower than matmuls."""
    models.set_attention(model, "eager")


def round_frozen_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Round frozen Linear weights through `dtype` and back (reproduces the base a bf16 run trained against)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype).float()


def make_accelerator(device: torch.device, dtype: torch.dtype, gradient_accumulation_steps: int):
    """An Accelerator with bf16 autocast or none; on CPU cpu=True.

    accelerate keeps one process-wide state; in a single process (a notebook kernel, the test suite) a run with
    another precision resets it instead of refusing.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    mixed_precision = runtime.mixed_precision_name(dtype)  # fp16 gets accelerate's loss scaling
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=device.type == "cpu",
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
