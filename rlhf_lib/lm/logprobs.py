"""Log-probabilities and entropy of sampled tokens over the vocabulary, without (B, T, V) fp32 temporaries.

The same maths as :func:`~rlhf_lib.lm.sequences.logprobs_from_logits` and
:func:`~rlhf_lib.lm.sequences.entropy_from_logits` (fp32, logits / T), as one autograd function that saves only the
log-normaliser for backward. Two implementations:

- eager, in row chunks that stay in cache (:func:`_chunked_logprobs`, :func:`_chunked_grad`);
- ``fused``: two ``torch.compile``'d kernels (:func:`_logprobs_entropy_lse`, :func:`_logprobs_grad`) that read each
  row's vocabulary from the (bf16) logits in one fused loop. PPO uses them wherever it compiles its transformer
  blocks (``PPOConfig.torch_compile``); they agree with the eager pass to fp32 rounding.

On CPU the full-vocabulary passes are a large share of a policy forward/backward, which is why they get this care.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T) at `tokens` and the entropy; only the log-normaliser is saved for backward."""

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        tokens: Tensor,
        temperature: float,
        chunk: int,  # type: ignore[override]
        fused: bool,
    ):
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


def _chunked_logprobs(logits: Tensor, tokens: Tensor, temperature: float, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Eager forward of :class:`_TokenLogprobs`: (log-probs, entropy, log-normaliser), each (B, T) fp32."""
    B, T, _ = logits.shape
    logprobs = logits.new_empty((B, T), dtype=torch.float32)
    entropy = torch.empty_like(logprobs)
    lse = torch.empty_like(logprobs)
    for b in range(B):
        for t in range(0, T, chunk):
            z = logits[b, t : t + chunk].float() / temperature  # (c, V)
            norm = torch.logsumexp(z, dim=-1)  # (c,)
            picked = z.gather(-1, tokens[b, t : t + chunk, None]).squeeze(-1)  # (c,)
            logprobs[b, t : t + chunk] = picked - norm
            # TRL entropy_from_logits: H = logsumexp(z) - sum(softmax(z) * z)
            entropy[b, t : t + chunk] = norm - (torch.exp(z - norm[:, None]) * z).sum(-1)
            lse[b, t : t + chunk] = norm
    return logprobs, entropy, lse


def _chunked_grad(
    logits: Tensor, tokens: Tensor, lse: Tensor, grad_logprobs: Tensor, temperature: float, chunk: int
) -> Tensor:
    """Eager backward of :class:`_TokenLogprobs`: the gradient w.r.t. the logits, (B, T, V) in their dtype."""
    grad = torch.empty_like(logits)
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(0, T, chunk):
            z = logits[b, t : t + chunk].float() / temperature  # (c, V)
            g = grad_logprobs[b, t : t + chunk, None].float()  # (c, 1)
            # d logp_k / d z = onehot(k) - softmax(z)
            grad_z = torch.exp(z - lse[b, t : t + chunk, None]).mul_(-g)
            grad_z.scatter_add_(-1, tokens[b, t : t + chunk, None], g)
            grad[b, t : t + chunk] = (grad_z / temperature).to(logits.dtype)
    return grad


def _logprobs_entropy_lse(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """The forward maths of :class:`_TokenLogprobs` on the whole (B, T, V) tensor, written for ``torch.compile``.

    Compiled, each row's vocabulary is read from the logits inside one fused loop (max, then sum exp and sum
    exp * z): no fp32 (B, T, V) temporary is materialised.
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
        from rlhf_lib.lm.models import compile_dynamic

        fn = {"logprobs": _logprobs_entropy_lse, "logprobs_grad": _logprobs_grad}[name]
        _COMPILED[name] = compile_dynamic(fn)
    return _COMPILED[name]


def token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float, chunk: int = 16, fused: bool = False
) -> tuple[Tensor, Tensor]:
    """(log-probs (B, T) with grad, entropy (B, T) detached) of `tokens` under softmax(logits / temperature).

    ``fused=True`` runs the maths as two ``torch.compile``'d kernels (forward, backward) instead of eager row chunks:
    the same values to fp32 rounding; the kernels compile once per process.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _TokenLogprobs.apply(logits, tokens.long(), float(temperature), chunk, fused)
