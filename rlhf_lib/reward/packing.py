"""Preference pairs packed one per row: the prompt once, then the chosen and the rejected response beside each other.

A chosen/rejected pair shares its prompt. Scored as two sequences, ``prompt + chosen`` and ``prompt + rejected``,
the prompt's tokens run through the model twice with identical results. Packed, a pair is one row::

    [ prompt (P) | chosen (C) | rejected (R) | pad ]      positions 0..P-1 | P..P+C-1 | P..P+R-1 | 0

with a per-row attention mask under which the prompt is causal, the chosen tokens see the prompt and their own
earlier tokens, and the rejected tokens see the prompt and their own earlier tokens but never the chosen ones. Every
response token thus sees the same keys at the same positions as in its own sequence, so the rewards (read at the
last token of each response) and their gradients are the same maths as scoring the two sequences apart, up to
floating-point summation order; the linear layers, norms and MLPs, all per token, run on P + C + R rows instead of
2P + C + R. Padding sits on the right and each pad token attends only to the row's first token (a finite softmax);
nothing real attends to a pad token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # segment ids of a packed row


@dataclass
class PackedPairs:
    """A batch of B pairs, one per row of L = the longest P + C + R of the batch (module docstring)."""

    input_ids: Tensor  # (B, L) long
    position_ids: Tensor  # (B, L) long, each token's position in its own sequence
    attention_mask: Tensor  # (B, 1, L, L) bool: True where query token q may attend to key token k
    chosen_last: Tensor  # (B,) long, column of the chosen response's last token
    rejected_last: Tensor  # (B,) long, column of the rejected response's last token
    lengths: Tensor  # (B,) long, P + C + R of each row
    margin: Tensor | None = None  # (B,) float, the pairs' margins when the loss uses them

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> PackedPairs:
        move = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return PackedPairs(**move)


def segment_ids(prompt_lengths: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, width: int) -> Tensor:
    """(B, width) segment of each column: PROMPT, CHOSEN, REJECTED or PAD."""
    col = torch.arange(width).unsqueeze(0)  # (1, L)
    p, c, r = (x.unsqueeze(1) for x in (prompt_lengths, chosen_lengths, rejected_lengths))  # (B, 1) each
    seg = torch.full((p.shape[0], width), PAD, dtype=torch.long)
    seg[col < p + c + r] = REJECTED
    seg[col < p + c] = CHOSEN
    seg[col < p] = PROMPT
    return seg


def pair_attention_mask(seg: Tensor) -> Tensor:
    """(B, 1, L, L) bool mask from (B, L) segment ids: causal, and a response sees the prompt and itself only."""
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)  # (B, L, 1), (B, 1, L)
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (L, L) key column <= query column
    visible = causal & (k != PAD) & (q != PAD) & ((k == PROMPT) | (k == q))
    visible[:, :, 0] |= q.squeeze(2) == PAD  # a pad query attends to the first token: a finite softmax
    return visible.unsqueeze(1)


def pack_pairs(rows: Sequence[dict[str, Any]], pad_id: int, margins: Sequence[float] | None = None) -> PackedPairs:
    """Pack rows with ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (token-id lists) into one batch on the CPU."""
    p = torch.tensor([len(r["prompt_ids"]) for r in rows])
    c = torch.tensor([len(r["chosen_ids"]) for r in rows])
    r_ = torch.tensor([len(r["rejected_ids"]) for r in rows])
    lengths = p + c + r_  # (B,)
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens = row["prompt_ids"] + row["chosen_ids"] + row["rejected_ids"]
        ids[i, : len(tokens)] = torch.tensor(tokens)
    seg = segment_ids(p, c, r_, width)
    col = torch.arange(width).unsqueeze(0).expand_as(seg)  # (B, L)
    # a rejected token's position restarts after the prompt: its column minus the chosen response's length
    positions = torch.where(seg == REJECTED, col - c.unsqueeze(1), col).masked_fill(seg == PAD, 0)
    return PackedPairs(
        input_ids=ids,
        position_ids=positions,
        attention_mask=pair_attention_mask(seg),
        chosen_last=p + c - 1,
        rejected_last=lengths - 1,
        lengths=lengths,
        margin=None if margins is None else torch.tensor(list(margins), dtype=torch.float32),
    )
