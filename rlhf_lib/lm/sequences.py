"""Sequence helpers of every stage that reads sampled tokens: EOS truncation, lengths and last-token indices of masks,
and per-token log-probabilities / entropy at a sampling temperature.

Conventions: B = batch, T = sequence length, V = vocab. Masks are bool or 0/1 float tensors where True/1 marks a
valid token. Only valid positions are read.

References: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"; TRL (trl/trainer/utils.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def as_bool(mask: Tensor) -> Tensor:
    """Return the mask as a bool tensor (True = valid)."""
    return mask if mask.dtype == torch.bool else mask != 0


def first_true_indices(bools: Tensor) -> Tensor:
    """Index of the first True in each row of a (B, T) bool tensor, T where a row has none."""
    # TRL utils.first_true_indices: min over (T for False, position for True)
    T = bools.size(-1)
    positions = torch.arange(T, device=bools.device)  # (T,)
    candidates = torch.where(bools, positions, T)  # (B, T)
    return candidates.min(dim=-1).values  # (B,)


def truncate_after_eos(responses: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Replace tokens after the first EOS with pad; return (truncated, response_mask, contains_eos)."""
    # N+ implementation details of RLHF with PPO (Huang et al. 2024): truncate after EOS, keep the EOS
    is_eos = responses == eos_token_id  # (B, T)
    eos_idx = first_true_indices(is_eos)  # (B,)  T if no EOS
    positions = torch.arange(responses.size(1), device=responses.device)  # (T,)
    response_mask = positions[None, :] <= eos_idx[:, None]  # (B, T)
    truncated = torch.where(response_mask, responses, pad_token_id)  # (B, T)
    contains_eos = is_eos.any(dim=1)  # (B,)
    return truncated, response_mask, contains_eos


def sequence_lengths(mask: Tensor) -> Tensor:
    """Number of valid tokens in each row of a (B, T) mask."""
    return as_bool(mask).sum(dim=-1)  # (B,)


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last valid token in each row of a (B, T) mask, -1 for an empty row."""
    # works for any mask, not only prefixes: first True of the reversed row
    T = mask.size(-1)
    return T - 1 - first_true_indices(as_bool(mask).flip(-1))  # (B,)


def _scaled_float_logits(logits: Tensor, temperature: float) -> Tensor:
    """Upcast logits to float32 and divide by the sampling temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # N+ implementation details of RLHF with PPO (Huang et al. 2024): rescore with the sampling temperature
    return logits.float() / temperature  # (B, T, V)


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at `tokens`, computed in float32."""
    logits = _scaled_float_logits(logits, temperature)  # (B, T, V)
    # TRL selective_log_softmax: gather - logsumexp, avoiding a second (B, T, V) tensor
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, computed in float32."""
    logits = _scaled_float_logits(logits, temperature)  # (B, T, V)
    # TRL utils.entropy_from_logits: H = logsumexp(z) - sum(softmax(z) * z)
    probs = F.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)  # (B, T)
