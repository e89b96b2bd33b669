"""PPO's experience: prompts in (a reproducible stream of left-padded batches), one update's rollout out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlhf_lib.core.io import pad


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
                raise ValueError(
                    f"{path} line {line_no}: 'prompt_ids' must be a non-empty list of token ids; "
                    "re-run the data stage to regenerate the file"
                )
            prompts.append(ids)
    if not prompts:
        raise ValueError(f"{path} holds no prompts; re-run the data stage")
    return prompts


def left_pad(seqs: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (ids, mask), both (B, P): generation appends on the right (``core.io.pad``)."""
    return pad(seqs, pad_token_id, "left", device)


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
        mine = picked[self.rank * local_batch : (self.rank + 1) * local_batch]
        return [self.prompts[i] for i in mine]

    def state_dict(self) -> dict[str, int]:
        return {"data_epoch": self.data_epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.data_epoch, self.position = int(state["data_epoch"]), int(state["position"])


# ----------------------------------------------------------------------------------------------------------------
# one update's experience


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


def sample_rows(roll: Rollout, tokenizer, n: int, update: int, episode: int) -> list[dict[str, Any]]:
    """The first `n` (query, response, score) rows of a rollout, decoded, for the sample table."""
    rows = []
    for i in range(min(n, roll.queries.shape[0])):
        query = roll.queries[i][roll.attention_mask[i, : roll.context_length].bool()]
        response = roll.responses[i][roll.response_mask[i]]
        rows.append(
            {
                "update": update,
                "episode": episode,
                "query": tokenizer.decode(query, skip_special_tokens=True),
                "response": tokenizer.decode(response, skip_special_tokens=True),
                "score": float(roll.scores[i]),
                "kl": float(roll.kl[i].sum()),
                "length": int(roll.response_mask[i].sum()),
                "eos": bool(roll.contains_eos[i]),
            }
        )
    return rows
