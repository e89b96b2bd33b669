"""Shared prompt prefixes: run the tokens every sequence of a batch begins with once, not once per sequence.

Chat-templated prompts share their opening tokens (SmolLM2's template alone adds a 21-token system prompt, and
prompts written from one instruction share more). In a full-sequence forward of a left-padded (B, L) batch those
tokens are computed B times with identical results. Here the batch is rearranged as one packed row:

    [ prefix (P tokens) | suffix of sequence 0 (S) | suffix of sequence 1 (S) | ... ]      P + B * S tokens

with each token's original position id, and an attention function (:func:`shared_prefix_attention`) that views
the suffixes as B rows of S (a reshape, no gather) and lets every suffix attend to the prefix plus its own earlier
tokens. Every token sees the same keys at the same positions as in the padded batch, so logits, values and
gradients are the same maths (up to floating-point summation order); the linear layers, norms and MLPs -- all
per-token -- run on P + B * S rows instead of B * (P + S). Backward sums the prefix's gradient over the B suffixes
through the expanded keys and values, as the padded batch does implicitly. Two other layouts were slower: the prefix
as an extra row of the batch ((B + 1) rows of max(P, S), which computes the prefix row's padding), and a packed row
without the suffixes' own padding (per-element index arithmetic to reassemble rows, and a slower backward).

Used by every full-sequence forward of the PPO trainer (policy, reference, value, reward), under
``models.attention(model, ATTENTION)``, whenever the rows share at least ``min_length`` prompt tokens
(:mod:`rlhf_lib.lm.policy_models`); generation is unaffected.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

ATTENTION = "rlhf_shared_prefix"  # the attention implementation name registered with transformers


@dataclass
class SharedPrefix:
    """A (B, L) left-padded batch as one packed row: the prefix, then B suffixes of S tokens (module docstring).

    Column j >= ``offset`` of the padded batch is column ``j - offset`` of its suffix (offset = P + the smallest
    left padding); a row's earlier columns are padding or prefix.
    """

    prefix_length: int  # P
    offset: int  # first padded-batch column that lands in the suffixes
    suffix_length: int  # S = L - offset
    input_ids: Tensor  # (1, P + B * S)
    position_ids: Tensor  # (1, P + B * S) each token's position in its own sequence
    attention_bias: Tensor  # (B, 1, S, P + S) suffixes' additive bias: 0 where a token may attend, min elsewhere
    prefix_bias: Tensor  # (P, P) the prefix's additive causal bias

    @property
    def batch(self) -> int:
        return self.attention_bias.shape[0]

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for a transformers model running with ``attn_implementation=ATTENTION``."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_bias,
            "position_ids": self.position_ids,
            "prefix_bias": self.prefix_bias,
        }

    def suffix_columns(self, columns: Tensor) -> Tensor:
        """Packed-row positions of padded-batch `columns` (all >= offset) in every suffix, sequence-major:
        (B * len(columns),); outputs gathered there reshape to (B, len(columns), ...)."""
        starts = self.prefix_length + torch.arange(self.batch, device=columns.device) * self.suffix_length  # (B,)
        return (starts[:, None] + (columns - self.offset)[None, :]).reshape(-1)

    def unpack(self, packed: Tensor, width: int) -> Tensor:
        """(1, P + B * S, ...) per-token outputs -> (B, width, ...) in padded-batch columns; earlier columns hold 0."""
        suffixes = packed[0, self.prefix_length :].reshape(self.batch, self.suffix_length, *packed.shape[2:])
        lead = suffixes.new_zeros((self.batch, width - self.suffix_length, *suffixes.shape[2:]))
        return torch.cat([lead, suffixes], dim=1)  # (B, width, ...)


def find_shared_prefix(
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    context_length: int,
    min_length: int = 8,
    dtype: torch.dtype = torch.float32,
) -> SharedPrefix | None:
    """Rearrange a left-padded (B, L) batch around the longest prompt prefix all rows share; None if that is
    shorter than `min_length` tokens or B < 2 (then the padded batch is as cheap).

    The prefix stops at least one token before each row's context ends, so the position that predicts the first
    response token stays in every suffix. `dtype` is that of the additive attention biases (the residual stream's).
    """
    B, L = input_ids.shape
    if B < 2 or context_length < 2:
        return None
    device = input_ids.device
    mask = attention_mask.bool()
    starts = mask[:, :context_length].long().argmax(1)  # (B,) first real prompt token (left padding)
    if not bool(mask[torch.arange(B, device=device), starts].all()):
        return None  # an empty prompt: nothing to share
    width = context_length - int(starts.max()) - 1  # the shortest prompt, less its last token
    if width < min_length:
        return None
    aligned = input_ids.gather(1, starts[:, None] + torch.arange(width, device=device))  # (B, width) prompts aligned
    differs = (aligned != aligned[:1]).any(0)  # (width,)
    P = int(differs.long().argmax()) if bool(differs.any()) else width
    if P < min_length:
        return None
    offset = P + int(starts.min())
    S = L - offset  # <= L - P, so the packed row (P + B * S tokens) is always shorter than the batch (B * L)
    col = torch.arange(offset, L, device=device)  # (S,) padded-batch columns of the suffixes
    suffix_mask = mask[:, offset:] & (col[None, :] >= (starts + P)[:, None])  # (B, S) drops shifted prefix tokens
    start0 = int(starts[0])

    def packed(values: Tensor) -> Tensor:  # (B, L) -> (1, P + B * S): row 0's prefix, then every suffix
        return torch.cat([values[0, start0 : start0 + P], values[:, offset:].reshape(-1)])[None]

    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()  # (S, S)
    allowed = torch.cat(
        [torch.ones(B, S, P, dtype=torch.bool, device=device), causal[None] & suffix_mask[:, None, :]], dim=2
    )  # (B, S, P + S)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    prefix_bias = torch.full((P, P), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return SharedPrefix(P, offset, S, packed(input_ids), packed(position_ids), bias[:, None], prefix_bias)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor,
    scaling: float,
    dropout: float = 0.0,
    *,
    prefix_bias: Tensor,
    **kwargs,
):
    """transformers attention function for a :class:`SharedPrefix` packed row: the model's own ``eager`` attention
    (matmuls, fp32 softmax for Llama) run on the prefix and on the B suffixes with the prefix's keys in front.

    query (1, H, P + B * S, D), key / value (1, Hkv, P + B * S, D); attention_mask: the suffixes' (B, 1, S, P + S)
    bias; prefix_bias: the prefix's causal (P, P) bias. Returns (1, P + B * S, H, D) like transformers' attention
    functions.
    """
    eager_attention_forward = sys.modules[type(module).__module__].eager_attention_forward  # Llama's, GPT-2's, ...
    P, B, S = prefix_bias.shape[0], attention_mask.shape[0], attention_mask.shape[2]
    Hkv, D = key.shape[1], key.shape[3]
    prefix_key, prefix_value = key[:, :, :P], value[:, :, :P]  # (1, Hkv, P, D)
    prefix_out, _ = eager_attention_forward(
        module, query[:, :, :P], prefix_key, prefix_value, prefix_bias[None, None], scaling, dropout
    )  # (1, P, H, D)

    def rows(t: Tensor) -> Tensor:  # (1, h, P + B * S, D) -> (B, h, S, D): the suffixes as rows, a view
        return t[0, :, P:].unflatten(1, (B, S)).transpose(0, 1)

    keys = torch.cat([prefix_key.expand(B, Hkv, P, D), rows(key)], dim=2)  # (B, Hkv, P + S, D)
    values = torch.cat([prefix_value.expand(B, Hkv, P, D), rows(value)], dim=2)
    suffix_out, _ = eager_attention_forward(
        module, rows(query), keys, values, attention_mask, scaling, dropout
    )  # (B, S, H, D)
    return torch.cat([prefix_out, suffix_out.flatten(0, 1)[None]], dim=1), None  # (1, P + B * S, H, D)


def register() -> None:
    """Make :data:`ATTENTION` a transformers attention implementation (idempotent; done on import)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, shared_prefix_attention)


register()
