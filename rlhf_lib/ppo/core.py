"""Pure tensor maths for PPO on language models (no models, no I/O, no globals).

Conventions: B = batch, T = response length, V = vocab. Masks are bool or 0/1 float
tensors where True/1 marks a valid token. Responses are right-padded, so the valid
tokens of a row normally form a prefix, but every function here only reads valid
positions: whatever sits in padded positions (even inf/nan) never reaches a valid
output, a statistic, or a gradient.

References used below:
  - Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
  - Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE"
  - Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
  - Schulman 2020, "Approximating KL Divergence" (blog, k1/k3 estimators)
  - Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"
  - TRL PPOTrainer (huggingface/trl, trl/trainer/ppo_trainer.py, trl/trainer/utils.py)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlhf_lib.lm.sequences import as_bool, last_valid_index

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3")


# ----------------------------------------------------------------------------
# masked statistics


def _zero_invalid(x: Tensor, mask: Tensor) -> Tensor:
    """Set invalid positions to 0 with `where`, so inf/nan padding cannot leak (unlike x * mask)."""
    return torch.where(as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over valid entries (all of them, or along `dim`); an empty selection gives nan."""
    # TRL utils.masked_mean, with `where` instead of x * mask so inf/nan padding cannot leak
    mask = as_bool(mask).expand_as(x)
    x = _zero_invalid(x, mask)
    total, count = (x.sum(), mask.sum()) if dim is None else (x.sum(dim), mask.sum(dim))
    return total / count.to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all valid entries (Bessel-corrected if `unbiased`)."""
    # TRL utils.masked_var: biased variance, then multiply by n / (n - 1)
    mask = as_bool(mask).expand_as(x)
    n = int(mask.sum().item())
    if n < (2 if unbiased else 1):
        need = "at least 2 valid elements for an unbiased variance" if unbiased else "at least 1 valid element"
        raise ValueError(f"masked_var needs {need}, but the mask has {n}.")
    mean = masked_mean(x, mask)  # ()
    var = masked_mean((x - mean) ** 2, mask)  # ()
    if unbiased:
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise x to zero mean / unit variance over valid entries; invalid outputs are 0."""
    # TRL utils.masked_whiten (eps = 1e-8); shift_mean=False keeps the mean, as TRL does for rewards
    mask = as_bool(mask).expand_as(x)
    mean, var = masked_mean(x, mask), masked_var(x, mask)  # (), ()
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_invalid(whitened, mask)


# ----------------------------------------------------------------------------
# response masks


# ----------------------------------------------------------------------------
# log-probabilities, entropy, KL


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs."""
    if estimator == "k1":
        # Schulman 2020 k1: log p - log q, unbiased, can be negative per token
        return logprobs - ref_logprobs
    if estimator == "k3":
        # Schulman 2020 k3: (r - 1) - log r with r = q / p; expm1 for accuracy near r = 1
        log_r = ref_logprobs - logprobs
        return (torch.expm1(log_r) - log_r).clamp_min(0.0)  # >= 0 mathematically; clamp rounding
    raise ValueError(f"unknown KL estimator {estimator!r}; valid options: {', '.join(KL_ESTIMATORS)}")


# ----------------------------------------------------------------------------
# rewards and advantages


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards: -kl_coef * KL on valid tokens, plus the score at each row's last valid token."""
    mask = as_bool(mask)
    kl = _zero_invalid(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask)  # (B, T)
    # Ziegler et al. 2019 sec. 2.2 / TRL PPOTrainer: R(x, y) = r(x, y) - beta * KL, per token
    non_score_reward = -kl_coef * kl  # (B, T)
    last = last_valid_index(mask)  # (B,)  -1 for empty rows, which then get no score
    positions = torch.arange(mask.size(1), device=mask.device)  # (T,)
    at_last = positions[None, :] == last[:, None]  # (B, T)
    # TRL PPOTrainer: the sequence-level score is added at the last valid (EOS) token
    rewards = non_score_reward + torch.where(at_last, scores.to(kl.dtype)[:, None], 0.0)  # (B, T)
    return rewards, non_score_reward, kl


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns over the valid tokens of each row."""
    # Schulman et al. 2016 GAE, backwards recursion as in TRL PPOTrainer / CleanRL.
    # Invalid positions are skipped (not treated as steps): this equals GAE on the compacted
    # valid tokens, the value after the last valid token is 0 (as TRL PPOTrainer zeroes values past EOS),
    # and nothing at an invalid position can reach a valid one.
    mask = as_bool(mask)
    rewards, values = _zero_invalid(rewards, mask), _zero_invalid(values, mask)  # (B, T)
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # (B,)  V(s_{t+1}) of the next valid token
    last_gae = rewards.new_zeros(B)  # (B,)  A_{t+1} of the next valid token
    advantages_reversed: list[Tensor] = []
    for t in reversed(range(T)):
        valid = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        gae = delta + gamma * lam * last_gae  # (B,)
        advantages_reversed.append(torch.where(valid, gae, 0.0))
        next_value = torch.where(valid, values[:, t], next_value)
        last_gae = torch.where(valid, gae, last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = _zero_invalid(advantages + values, mask)  # (B, T)
    return advantages, returns


# ----------------------------------------------------------------------------
# losses


def policy_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
) -> dict[str, Tensor]:
    """PPO clipped surrogate loss (differentiable `loss`) and detached diagnostics."""
    mask = as_bool(mask)
    advantages = _zero_invalid(advantages, mask)  # (B, T)
    # log-ratio zeroed on padding before exp, so garbage there cannot produce nan gradients
    log_ratio = _zero_invalid(new_logprobs - old_logprobs, mask)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    # Schulman et al. 2017 eq. 7, written as a loss as in TRL PPOTrainer: max of the negated terms
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    # TRL PPOTrainer: token-level masked mean over the whole batch
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)  # ()
    with torch.no_grad():
        # TRL PPOTrainer diagnostics
        clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return {"loss": loss, "clipfrac": clipfrac, "approxkl": approxkl, "ratio": ratio_mean}


def value_loss(
    new_values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
) -> dict[str, Tensor]:
    """Clipped value-function loss (differentiable `loss`) and the detached clip fraction."""
    mask = as_bool(mask)
    new_values = _zero_invalid(new_values, mask)  # (B, T)
    old_values, returns = _zero_invalid(old_values, mask), _zero_invalid(returns, mask)  # (B, T)
    # TRL PPOTrainer / OpenAI lm-human-preferences: value clipping around the rollout values
    # clamp(v, old - c, old + c) rather than old + clamp(v - old): equal maths, but no rounding ties that would be
    # counted as clipped when v == old (e.g. the first PPO step)
    v_clipped = torch.clamp(new_values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (new_values - returns) ** 2  # (B, T)
    vf_losses2 = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)  # ()
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return {"loss": loss, "clipfrac": clipfrac}


# ----------------------------------------------------------------------------
# KL coefficient controllers


class FixedKLController:
    """Constant KL coefficient (TRL FixedKLController)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards `target` (Ziegler et al. 2019, sec. 2.2)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Multiply the coefficient by 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""
        # Ziegler et al. 2019 sec. 2.2 / TRL AdaptiveKLController
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])
