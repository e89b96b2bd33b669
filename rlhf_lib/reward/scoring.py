"""A saved reward model as the stages use it: load its folder (with ``reward_stats.json``), check that its tokenizer
is the policy's, and score token sequences at their last real token (the reward stage's evaluation and the evaluation
stage both score through :func:`score_sequences`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_lib.core import runtime
from rlhf_lib.core.io import pad
from rlhf_lib.core.runs import read_json
from rlhf_lib.lm import models
from rlhf_lib.lm.sequences import last_valid_index

STATS_FILE = "reward_stats.json"


class TokenizerMismatchError(ValueError):
    """The reward model's tokenizer differs from the policy's, so it would misread the policy's token ids."""


def check_same_tokenizer(
    rm_tokenizer: PreTrainedTokenizerBase, policy_tokenizer: PreTrainedTokenizerBase, what: str = "reward model"
) -> None:
    """Raise TokenizerMismatchError unless both tokenizers map the same strings to the same ids (and pad/eos agree)."""
    problems = []
    if len(rm_tokenizer) != len(policy_tokenizer):
        problems.append(f"vocabulary size {len(rm_tokenizer)} vs {len(policy_tokenizer)}")
    elif rm_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        problems.append("the vocabularies map tokens to different ids")
    for name in ("eos_token_id", "pad_token_id"):
        a, b = getattr(rm_tokenizer, name), getattr(policy_tokenizer, name)
        if a != b:
            problems.append(f"{name} {a} vs {b}")
    if problems:
        raise TokenizerMismatchError(
            f"the {what}'s tokenizer differs from the policy's ({'; '.join(problems)}). PPO scores the policy's token "
            "ids directly, so the reward model must use the policy's tokenizer: set reward_model.base_model to a model "
            "with the same tokenizer as common.model (or leave it empty to use common.model)."
        )


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The ``score`` head of a sequence classifier (under its peft wrapper, if any)."""
    inner = models.peft_base(model)
    if not hasattr(inner, "score"):
        raise TypeError(f"{type(inner).__name__} has no `score` head; reward models must be *ForSequenceClassification")
    return inner.score


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body under the score head (under its peft wrapper, if any)."""
    inner = models.peft_base(model)
    return getattr(inner, inner.base_model_prefix)


@torch.no_grad()
def score_sequences(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward of each (B, T) sequence, read at its last real (attention_mask == 1) token, whatever the padding side.

    Position ids come from the mask, so a left-padded sequence gets the same positions as unpadded (HF's default
    positions would shift it). Returns (B,) float32.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be (B, T)"
        )
    last = last_valid_index(attention_mask)  # (B,)
    if (last < 0).any():
        raise ValueError("score_sequences got a row with no real token (attention_mask all 0)")
    position_ids = models.position_ids_from_mask(attention_mask)  # (B, T)
    hidden = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    pooled = hidden[torch.arange(hidden.size(0), device=device), last]  # (B, H)
    with torch.autocast(device_type=device.type, enabled=False):  # head in fp32: bf16 rewards tie spuriously
        return score_head(model)(pooled.float()).squeeze(-1).float()  # (B,)


def score_pairs(
    model: torch.nn.Module,
    rows: Sequence[dict[str, Any]],
    pad_id: int,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of prompt+chosen and prompt+rejected for each row, batched by length; returns two (N,) arrays."""
    from tqdm.auto import tqdm

    seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    out = np.empty(len(seqs), dtype=np.float64)
    device = next(model.parameters()).device
    model.eval()
    step = 2 * batch_size
    for start in tqdm(range(0, len(order), step), desc="scoring pairs", leave=False):
        idx = order[start : start + step]
        ids, mask = pad([seqs[i] for i in idx], pad_id, side="right")
        with runtime.autocast(device, dtype):
            out[idx] = score_sequences(model, ids, mask).cpu().numpy()
    return out[: len(rows)], out[len(rows) :]


def load_reward_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    require_stats: bool = True,
    policy_tokenizer: PreTrainedTokenizerBase | None = None,
):
    """Load a saved RM folder: (model in eval mode, its tokenizer, reward_stats dict or None).

    With ``policy_tokenizer`` the RM's tokenizer is checked against it (TokenizerMismatchError when they differ).
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no saved reward model (config.json missing); run the reward_model stage")
    stats = read_json(path / STATS_FILE)
    if stats is None and require_stats:
        raise FileNotFoundError(
            f"{path / STATS_FILE} missing: the reward_model stage did not finish its evaluation "
            "(evaluate_reward_model writes it); re-run notebooks/02_reward_model"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    if model.config.num_labels != 1:
        raise ValueError(f"{path}: a reward model has num_labels=1, this one has {model.config.num_labels}")
    if model.config.pad_token_id != tokenizer.pad_token_id:
        raise ValueError(
            f"{path}: model pad_token_id {model.config.pad_token_id} != tokenizer's {tokenizer.pad_token_id}"
        )
    if policy_tokenizer is not None:
        check_same_tokenizer(tokenizer, policy_tokenizer)
    model = models.disable_dropout(model).to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer, stats
