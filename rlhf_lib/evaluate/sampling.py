"""Sampling and scoring a policy, the one evaluation path of every policy (the evaluation stage, the methods
comparison, best-of-N): one response per prompt with the seed reset first (so policies are paired), truncated after
the first EOS, the per-sequence KL against a reference measured on those samples, and the reward-model and gold
scores of the samples. The reference's own samples and scores are drawn once per exact inputs and then read back
(:mod:`rlhf_lib.evaluate.reference_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from rlhf_lib.core import runtime
from rlhf_lib.core.io import pad
from rlhf_lib.evaluate.stats import sequence_kl
from rlhf_lib.lm import generation, models
from rlhf_lib.lm.sequences import logprobs_from_logits, truncate_after_eos

# Scorers are plain functions so tests (and users) can swap them in.
RMScorer = Callable[[list[list[int]]], np.ndarray]  # token ids of prompt + response -> (N,) reward-model scores
GoldScorer = Callable[[list[str]], Sequence[float]]  # response texts -> (N,) gold scores


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """(B, L) token ids and attention mask of variable-length sequences, padded on `side` (``core.io.pad``)."""
    return pad(sequences, pad_id, side)


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings shared by every policy in one evaluation (so comparisons are paired)."""

    response_length: int
    temperature: float
    batch_size: int
    seed: int
    device: torch.device
    dtype: torch.dtype

    def to_dict(self) -> dict[str, Any]:
        return {
            "response_length": self.response_length,
            "temperature": self.temperature,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": str(self.device),
            "dtype": str(self.dtype),
        }


def _forward_kwargs(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    query: Tensor,
    query_mask: Tensor,
    responses: Tensor,
    response_mask: Tensor,
    temperature: float,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(B, R) log-probs of `responses` given left-padded `query`, at the sampling temperature (float32)."""
    R = responses.size(1)
    input_ids = torch.cat([query, responses], dim=1)  # (B, P + R)
    attention = torch.cat([query_mask.long(), response_mask.long()], dim=1)  # (B, P + R)
    # TRL PPOTrainer forward(): positions count real tokens only, so left padding does not shift them
    position_ids = models.position_ids_from_mask(attention)  # (B, P + R)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids}
    keep = "logits_to_keep" in _forward_kwargs(model)
    if keep:
        kwargs["logits_to_keep"] = R + 1  # only the positions that predict response tokens (saves a (B, P, V) tensor)
    with runtime.autocast(input_ids.device, dtype):
        logits = model(**kwargs).logits  # (B, R + 1, V) or (B, P + R, V)
    logits = logits[:, -(R + 1) : -1]  # (B, R, V): position t predicts response token t
    return logprobs_from_logits(logits, responses, temperature)  # (B, R)


@dataclass
class Samples:
    """Responses of one policy to a list of prompts, truncated after the first EOS."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # valid tokens only, EOS included when the response finished
    texts: list[str]  # decoded responses, special tokens skipped
    contains_eos: np.ndarray  # (N,) bool
    kl: np.ndarray  # (N,) per-sequence KL(policy || reference) estimate

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(r) for r in self.response_ids], dtype=np.int64)

    @property
    def sequences(self) -> list[list[int]]:
        """Prompt + response token ids, as the reward model scores them."""
        return [p + r for p, r in zip(self.prompt_ids, self.response_ids)]


@torch.no_grad()
def sample_policy(
    policy: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    reference: torch.nn.Module | None = None,
    desc: str = "sampling",
) -> Samples:
    """Sample one response per prompt (seed reset first, so policies are paired) and measure KL vs `reference`.

    With `reference` None or the policy itself, KL is 0 by definition and not computed.
    """
    from tqdm.auto import tqdm

    runtime.seed_everything(settings.seed)  # same seed for every policy: same random stream, paired samples
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    # pure sampling from softmax(logits / T), no top-k / top-p (TRL PPOTrainer; the KL estimate needs it), with the
    # same decode loop PPO samples with
    sampler = generation.ResponseSampler(policy, settings.response_length, settings.temperature, eos_id, pad_id)
    measure_kl = reference is not None and reference is not policy
    policy.eval()
    out_ids: list[list[int]] = []
    has_eos: list[np.ndarray] = []
    kls: list[np.ndarray] = []
    bs = settings.batch_size
    for start in tqdm(range(0, len(prompt_ids), bs), desc=desc, leave=False):
        chunk = [list(p) for p in prompt_ids[start : start + bs]]
        query, query_mask = pad_batch(chunk, pad_id, side="left")  # (B, P)
        query, query_mask = query.to(settings.device), query_mask.to(settings.device)
        with runtime.autocast(settings.device, settings.dtype):
            responses, steps = sampler(query, query_mask)
        responses = responses[:, :steps]  # (B, R') with R' <= response_length
        # N+ implementation details (Huang et al. 2024): truncate after the first EOS, keep the EOS
        responses, mask, contains_eos = truncate_after_eos(responses, eos_id, pad_id)  # (B, R'), (B, R'), (B,)
        if measure_kl:
            logp = response_logprobs(policy, query, query_mask, responses, mask, settings.temperature, settings.dtype)
            ref_logp = response_logprobs(
                reference, query, query_mask, responses, mask, settings.temperature, settings.dtype
            )
            kls.append(sequence_kl(logp, ref_logp, mask).cpu().numpy())
        else:
            kls.append(np.zeros(len(chunk)))
        responses, mask = responses.cpu(), mask.cpu()
        out_ids.extend(row[m].tolist() for row, m in zip(responses, mask))
        has_eos.append(contains_eos.cpu().numpy())
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out_ids]
    return Samples(
        prompt_ids=[list(p) for p in prompt_ids],
        response_ids=out_ids,
        texts=texts,
        contains_eos=np.concatenate(has_eos) if has_eos else np.zeros(0, dtype=bool),
        kl=np.concatenate(kls).astype(np.float64) if kls else np.zeros(0),
    )


def reward_model_scorer(
    path: Path, settings: GenerationSettings, policy_tokenizer=None, reward: str = "model"
) -> RMScorer:
    """Score prompt + response token ids with the stage-2 reward model (right padding, batched).

    ``reward``: "model" scores with the saved model (a single reward model, or an ensemble's WARM); mean / min /
    uwo with the ensemble's members combined (:mod:`rlhf_lib.reward.combined`)."""
    from rlhf_lib.reward.scoring import load_reward_model, score_sequences

    if not Path(path).exists():
        raise FileNotFoundError(f"reward model folder {path} does not exist: run the reward_model stage first")
    if reward != "model":
        from rlhf_lib.reward.combined import sequence_scorer

        return sequence_scorer(path, reward, settings.device, settings.dtype, settings.batch_size, policy_tokenizer)
    # the RM reads the policy's token ids directly, so their tokenizers must agree (checked by reward_scoring.py)
    model, tokenizer, _stats = load_reward_model(path, settings.device, policy_tokenizer=policy_tokenizer)
    model.eval()
    pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(sequences: list[list[int]]) -> np.ndarray:
        out: list[np.ndarray] = []
        for start in range(0, len(sequences), settings.batch_size):
            ids, mask = pad_batch(sequences[start : start + settings.batch_size], pad_id, side="right")  # (B, L)
            with runtime.autocast(settings.device, settings.dtype):
                scores = score_sequences(model, ids.to(settings.device), mask.to(settings.device))  # (B,)
            out.append(scores.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    return score


def score_samples(
    samples: Samples, rm_scorer: RMScorer, gold_scorer: GoldScorer | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(N,) reward-model scores of prompt + response and (N,) gold scores of the response text (or None)."""
    rm = np.asarray(rm_scorer(samples.sequences), dtype=np.float64)
    gold = None if gold_scorer is None else np.asarray(list(gold_scorer(samples.texts)), dtype=np.float64)
    for name, arr in (("reward model", rm), ("gold scorer", gold)):
        if arr is not None and arr.shape != (len(samples.texts),):
            raise ValueError(f"the {name} returned {arr.shape} scores for {len(samples.texts)} responses")
    return rm, gold
