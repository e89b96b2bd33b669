"""Rewards of packed pairs, and the frozen trunk of a reward model computed once instead of once per epoch.

With ``reward_model.trainable_top_layers = T`` the embeddings and every block below the top T are frozen (no
adapters, no gradients), so their output for a pair never changes during training. :class:`TrunkCache` runs the
frozen trunk once over the training pairs (no grad) and keeps each pair's hidden states; every epoch (and every
ensemble member) then runs only the T trained blocks, the final norm and the score head on them. The result is the
same maths as the full forward each step, up to floating-point summation order: the hidden states are kept at the
precision the blocks pass them on in (fp32, the residual stream under autocast).

The split needs a decoder whose blocks take the residual stream, the attention mask and rotary position embeddings
(``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``: the Llama family, SmolLM2 included). Other architectures
(GPT-2) run the whole forward every step, with the same packed pairs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from rlhf_lib.core import runtime
from rlhf_lib.reward.packing import PackedPairs, pack_pairs
from rlhf_lib.reward.scoring import backbone, score_head

SPLIT_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")  # what a backbone needs for a trunk / top split


def can_split(model: nn.Module) -> bool:
    """Whether the backbone's blocks can be run from a stored residual stream (module docstring)."""
    body = backbone(model)
    return all(hasattr(body, part) for part in SPLIT_PARTS)


def run_blocks(body: nn.Module, hidden: Tensor, batch: PackedPairs, blocks: Sequence[nn.Module]) -> Tensor:
    """(B, L, H) residual stream through ``blocks`` of a Llama-family backbone, under the batch's pair mask."""
    position_embeddings = body.rotary_emb(hidden, position_ids=batch.position_ids)
    for block in blocks:
        hidden = block(
            hidden,
            attention_mask=batch.attention_mask,
            position_embeddings=position_embeddings,
            position_ids=batch.position_ids,
        )
    return hidden


def head_rewards(model: nn.Module, pooled: Tensor) -> Tensor:
    """(..., H) final hidden states -> (...) rewards, the score head in fp32 (bf16 rewards tie spuriously)."""
    device_type = pooled.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        return score_head(model)(pooled.float()).squeeze(-1)


def gather_last(hidden: Tensor, batch: PackedPairs) -> Tensor:
    """(B, L, H) -> (2, B, H): the hidden state at each pair's chosen and rejected last token."""
    rows = torch.arange(batch.batch, device=hidden.device)
    return torch.stack([hidden[rows, batch.chosen_last], hidden[rows, batch.rejected_last]])


def pair_rewards(model: nn.Module, batch: PackedPairs) -> tuple[Tensor, Tensor]:
    """Rewards (B,), (B,) of each pair's chosen and rejected response: the whole model on the packed batch."""
    hidden = backbone(model)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state  # (B, L, H), already through the final norm
    chosen, rejected = head_rewards(model, gather_last(hidden, batch))
    return chosen, rejected


def top_rewards(model: nn.Module, hidden: Tensor, batch: PackedPairs, first_block: int) -> tuple[Tensor, Tensor]:
    """Rewards from the trunk's (B, L, H) output: blocks ``first_block`` and up, the final norm, the score head."""
    body = backbone(model)
    top = run_blocks(body, hidden, batch, body.layers[first_block:])
    pooled = body.norm(gather_last(top, batch))  # (2, B, H): the norm is per token, so only where it is read
    chosen, rejected = head_rewards(model, pooled)
    return chosen, rejected


class TrunkCache:
    """Each pair's hidden states after the frozen blocks ``[0, first_block)``, computed once (module docstring).

    ``features[i]`` is (P + C + R, H) for pair ``i``; :meth:`batch` pads a subset back into a (B, L, H) batch.
    """

    def __init__(
        self,
        model: nn.Module,
        rows: Sequence[dict[str, Any]],
        pad_id: int,
        first_block: int,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 16,
    ) -> None:
        from tqdm.auto import tqdm

        self.rows, self.pad_id, self.first_block = list(rows), pad_id, first_block
        body = backbone(model)
        lengths = [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in self.rows]
        order = sorted(range(len(self.rows)), key=lambda i: lengths[i])  # similar lengths together: less padding
        self.features: list[Tensor | None] = [None] * len(self.rows)
        with torch.no_grad():
            for start in tqdm(range(0, len(order), batch_size), desc="frozen blocks, once", leave=False):
                idx = order[start : start + batch_size]
                batch = pack_pairs([self.rows[i] for i in idx], pad_id).to(device)
                with runtime.autocast(device, dtype):
                    hidden = run_blocks(body, body.embed_tokens(batch.input_ids), batch, body.layers[:first_block])
                for j, i in enumerate(idx):
                    self.features[i] = hidden[j, : lengths[i]].clone()  # (P + C + R, H)

    def batch(self, idx: Sequence[int], margins: Sequence[float] | None = None) -> tuple[Tensor, PackedPairs]:
        """The stored trunk output of pairs ``idx`` as a right-padded (B, L, H) batch, and their packed layout."""
        device = self.features[idx[0]].device
        batch = pack_pairs([self.rows[i] for i in idx], self.pad_id, margins).to(device)
        hidden = torch.nn.utils.rnn.pad_sequence([self.features[i] for i in idx], batch_first=True)  # (B, L, H)
        return hidden, batch
