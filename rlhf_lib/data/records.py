"""The rows of the data contract: prompts rendered with the chat template and tokenised exactly as PPO conditions on
them, responses tokenised as the policy would generate them, and the prompt and pair records of the stage's jsonl
files.

Prompts use the tokenizer's chat template (``add_generation_prompt=True``; GPT-2-like tokenizers get
``models.SIMPLE_CHAT_TEMPLATE``): ``prompt_text``/``prompt_ids`` are exactly what PPO conditions on. A response's
ids are what the policy would generate after it: the template's assistant prefix (e.g. the space after
``"Assistant:"``), the text, then EOS — EOS only if the response is complete, so a response cut at
``max_response_length`` looks unfinished, as PPO will see cut responses.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

_PROBE = "RLHFLAB_RESPONSE_PROBE"
# Tokenising a response over max_response_length: first a prefix of CHARS_PER_TOKEN_CAP characters per token wanted
# (well above what tokenizers average on prose; the prefix grows when it is not enough), keeping CUT_MARGIN_TOKENS
# tokens beyond the limit so the tokens at the cut, which may merge differently, are never among those kept.
CHARS_PER_TOKEN_CAP = 8
CUT_MARGIN_TOKENS = 16


class ChatFormatter:
    """Prompt text/ids with the chat template, response ids as the policy would generate them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.response_prefix = self._probe_prefix()

    def _probe_prefix(self) -> str:
        """What the template writes between the generation prompt and an assistant message's text."""
        msgs = [{"role": "user", "content": "hi"}]
        gen = self.prompt_text(msgs)
        full = self.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": _PROBE}], tokenize=False)
        if full.startswith(gen) and _PROBE in full[len(gen) :]:
            return full[len(gen) : full.index(_PROBE, len(gen))]
        return ""

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def response_ids(self, text: str, max_len: int | None = None) -> list[int]:
        """Template prefix + text + EOS (a complete response).

        With ``max_len``, a text far longer than that is tokenised from a character prefix only, so a huge response
        costs bounded memory. The prefix holds more than ``max_len`` + ``CUT_MARGIN_TOKENS`` tokens (it grows until
        it does, or is the whole text); tokenisation is local, so its first ``max_len`` ids are those of the whole
        text, and the result (no EOS) is still over ``max_len``: truncated or dropped as the whole text would be.
        """
        budget = CHARS_PER_TOKEN_CAP * (max_len + CUT_MARGIN_TOKENS) if max_len else len(text)
        while budget < len(text):
            ids = self.ids(self.response_prefix + text[:budget])
            if len(ids) > max_len + CUT_MARGIN_TOKENS:
                return ids
            budget *= 4
        return self.ids(self.response_prefix + text) + [self.eos_id]

    def decode_response(self, ids: Sequence[int]) -> str:
        """Text of response ids (EOS and the template prefix removed)."""
        text = self.tokenizer.decode([t for t in ids if t != self.eos_id], skip_special_tokens=True)
        return (
            text[len(self.response_prefix) :]
            if self.response_prefix and text.startswith(self.response_prefix)
            else text
        )


def prompt_id(messages: list[dict[str, str]]) -> str:
    """Stable id of a prompt (hash of its messages)."""
    return "p-" + hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]


def fit_response(
    fmt: ChatFormatter, ids: list[int], text: str, max_len: int, truncate: bool
) -> tuple[list[int], str, bool] | None:
    """(ids, text, was_truncated) within max_len tokens, or None if the pair must be dropped."""
    if len(ids) <= max_len:
        return ids, text, False
    if not truncate:
        return None
    cut = ids[:max_len]  # no EOS: an unfinished response, as PPO sees a response cut at its length limit
    return cut, fmt.decode_response(cut), True


def prompt_record(pid: str, messages: list[dict[str, str]], fmt: ChatFormatter) -> dict[str, Any]:
    text = fmt.prompt_text(messages)
    return {"id": pid, "prompt": messages, "prompt_text": text, "prompt_ids": fmt.ids(text)}


def pair_record(
    pair_id: str,
    prompt: dict[str, Any],
    chosen: tuple[list[int], str],
    rejected: tuple[list[int], str],
    score_chosen: float | None = None,
    score_rejected: float | None = None,
    gold_chosen: float | None = None,
    gold_rejected: float | None = None,
) -> dict[str, Any]:
    """One line of train_pairs.jsonl / eval_pairs.jsonl (the data contract)."""
    margin = score_chosen - score_rejected if score_chosen is not None and score_rejected is not None else None
    return {
        "id": pair_id,
        "prompt_id": prompt["id"],
        "prompt": prompt["prompt"],
        "prompt_text": prompt["prompt_text"],
        "chosen": chosen[1],
        "rejected": rejected[1],
        "prompt_ids": prompt["prompt_ids"],
        "chosen_ids": chosen[0],
        "rejected_ids": rejected[0],
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
        "gold_chosen": gold_chosen,
        "gold_rejected": gold_rejected,
        "margin": margin,
    }
