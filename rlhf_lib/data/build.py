"""Stage 1: preference data for the reward model, and prompt-only data for PPO and evaluation.

Two sources, one output schema (see the data contract in the README / ``report.json``):

- ``dataset: simulated`` (offline default): the shipped prompt set, responses sampled from the policy model (or the
  shipped samples of the bundled SmolLM2) and labels from a simulated Bradley–Terry annotator on a hidden gold score
  (:mod:`rlhf_lib.data.annotator`).
- a real dataset, by hub id or local file (``.jsonl``/``.json``/``.csv``/``.parquet`` or a dataset folder), in one of
  three formats, ``ultrafeedback``, ``hh`` or ``plain`` (read and checked by :mod:`rlhf_lib.data.formats`).

Prompts and responses are tokenised exactly as PPO sees them (:mod:`rlhf_lib.data.records`). The overview figure of
the written data is :func:`rlhf_lib.data.plots.plot_data_overview`.

Splits are by prompt, never by row: the PPO and evaluation prompts are prompts with no pair in the reward-model
data (where the dataset is large enough), and the RM eval pairs' prompts are disjoint from the RM train pairs'.
Everything is deterministic under ``seed``. Every dropped or truncated pair is counted with its reason in
``report.json`` (TRL's RewardTrainer drops pairs over ``max_length`` silently; this stage says so).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from rlhf_lib.core import io
from rlhf_lib.core.config import CommonConfig
from rlhf_lib.data import annotator
from rlhf_lib.data.formats import FORMATS, DataError, Example, detect_format, load_raw, normalise
from rlhf_lib.data.records import ChatFormatter, fit_response, pair_record, prompt_id, prompt_record

OUTPUT_FILES = ("train_pairs.jsonl", "eval_pairs.jsonl", "ppo_prompts.jsonl", "eval_prompts.jsonl")


@dataclass
class DataConfig(CommonConfig):
    """Settings of the data stage (notebooks/01_data_prep.ipynb)."""

    dataset: str = "simulated"  # "simulated": offline annotator on the shipped prompt set; else a hub id
    #   (trl-lib/ultrafeedback_binarized, Anthropic/hh-rlhf) or a local .jsonl/.json/.csv/.parquet file or dataset
    #   folder
    dataset_format: str = "auto"  # auto | ultrafeedback | hh | plain (see rlhf_lib/data/formats.py); auto detects it
    #   from the columns
    dataset_split: str = "train"  # split of a hub dataset or dataset folder to read (a single local file is split
    #   "train")
    max_pairs: int = 0  # cap on preference pairs kept (train + eval), taken prompt by prompt in seeded order; 0: no cap
    eval_fraction: float = 0.15  # share of the RM prompts whose pairs are held out to evaluate the reward model
    max_prompt_length: int = 256  # tokens of the chat-templated prompt; pairs and prompts with longer prompts are
    #   dropped (counted)
    max_response_length: int = 128  # tokens of a response including its EOS; longer ones are handled by
    #   truncate_responses
    truncate_responses: bool = True  # true: cut responses over max_response_length (no EOS; counted); false: drop the
    #   pair (counted)
    on_bad_row: str = "error"  # error: stop at the first malformed row, naming file, row and field; drop: skip it and
    #   count it
    n_ppo_prompts: int = 256  # prompts for PPO training (prompt only, no response)
    n_eval_prompts: int = 128  # held-out prompts for the evaluation stage, disjoint from the RM and PPO prompts
    n_rm_prompts: int = 1400  # simulated: prompts answered to build RM pairs (the prompt set has 1,400)
    samples_per_prompt: int = 2  # simulated: responses sampled per prompt; samples (0,1), (2,3), ... form pairs
    generation_max_new_tokens: int = 128  # simulated: response token limit when sampling (a response cut here has no
    #   EOS)
    generation_temperature: float = 0.8  # simulated: sampling temperature (pure sampling, no top-k / top-p)
    generation_batch_size: int = 32  # simulated: prompts per generate() call (each yields samples_per_prompt sequences)
    annotator_beta: float = 4.0  # simulated: Bradley–Terry inverse temperature, P(a chosen) is sigmoid(beta * (gold_a -
    #   gold_b))
    use_shipped_responses: bool = True  # simulated: read the responses shipped for bundled:smollm2-135m-instruct
    #   instead of sampling (which takes longer on a small CPU than the whole pipeline)

    def check(self) -> None:
        """Cross-field checks (raise ValueError naming the field)."""
        if self.dataset_format not in FORMATS:
            raise ValueError(f"dataset_format must be one of {', '.join(FORMATS)}, got {self.dataset_format!r}")
        if self.on_bad_row not in ("error", "drop"):
            raise ValueError(f"on_bad_row must be 'error' or 'drop', got {self.on_bad_row!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("max_prompt_length", "max_response_length", "generation_max_new_tokens", "generation_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_pairs", "n_ppo_prompts", "n_eval_prompts", "n_rm_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ValueError(
                f"samples_per_prompt must be >= 2 (two samples make a pair), got {self.samples_per_prompt}"
            )
        if self.generation_temperature <= 0:
            raise ValueError(f"generation_temperature must be > 0, got {self.generation_temperature}")
        if self.annotator_beta < 0:
            raise ValueError(f"annotator_beta must be >= 0, got {self.annotator_beta}")
        if not self.dataset:
            raise ValueError("dataset must be 'simulated', a hub id or a local path")


def _say(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------
def seeded_order(keys: Sequence[str], seed: int) -> list[str]:
    """Unique keys in a seeded random order that does not depend on the input order."""
    uniq = sorted(set(keys))
    return [uniq[i] for i in np.random.default_rng(seed).permutation(len(uniq))]


def split_eval_prompts(keys: Sequence[str], eval_fraction: float, seed: int) -> set[str]:
    """The prompt keys whose pairs are held out (at least one when eval_fraction > 0 and there are >= 2 prompts)."""
    order = seeded_order(keys, seed)
    n_eval = round(eval_fraction * len(order))
    if eval_fraction > 0 and len(order) >= 2:
        n_eval = min(max(n_eval, 1), len(order) - 1)
    return set(order[:n_eval])


def prompt_split_sizes(n_prompts: int, n_eval_prompts: int, n_ppo_prompts: int) -> tuple[int, int]:
    """How many distinct prompts go to evaluation and to PPO: at most a quarter / what leaves half for RM pairs."""
    n_eval = min(n_eval_prompts, n_prompts // 4)
    n_ppo = min(n_ppo_prompts, max(0, n_prompts - n_eval - (n_prompts + 1) // 2))
    return n_eval, n_ppo


# ----------------------------------------------------------------------------------------------------------------
# Building the datasets
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Built:
    """Everything the stage writes, before writing."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    ppo_prompts: list[dict[str, Any]]
    eval_prompts: list[dict[str, Any]]
    dropped: Counter  # pairs dropped, by reason
    truncated: Counter  # responses cut to max_response_length, by side
    prompts_dropped: Counter  # PPO/eval prompts skipped, by reason
    info: dict[str, Any]


class PromptSplit(NamedTuple):
    """Distinct prompts of a real dataset, split by prompt (keys are the prompts' JSON)."""

    eval_prompts: list[dict[str, Any]]  # prompt records for the evaluation stage
    ppo_prompts: list[dict[str, Any]]  # prompt records for PPO
    rm_keys: list[str]  # prompts whose pairs go to the reward model, in seeded order
    prompt_only_keys: list[str]  # prompts used as eval/PPO prompts (their pairs are not used)


def _load_examples(cfg: DataConfig) -> tuple[Any, str, list[Example], Counter]:
    """Read the dataset, pick its format, normalise its rows to examples; (raw, format, examples, dropped)."""
    raw = load_raw(cfg.dataset, cfg.dataset_split, cfg.on_bad_row)
    fmt_name = detect_format(raw) if cfg.dataset_format == "auto" else cfg.dataset_format
    _say(f"loaded {len(raw.rows):,} rows from {raw.source}; format {fmt_name}")
    examples, dropped = normalise(raw, fmt_name, cfg.on_bad_row)
    if not examples:
        raise DataError(f"{raw.source}: no usable pairs left after filtering (dropped: {dict(dropped)})")
    return raw, fmt_name, examples, dropped


def _group_by_prompt(examples: Sequence[Example]) -> tuple[dict[str, list[Example]], dict[str, list[dict]]]:
    """Examples grouped by prompt (key: the prompt's JSON), and each key's messages (as its last example has them)."""
    groups: dict[str, list[Example]] = {}
    messages_of: dict[str, list[dict]] = {}
    for ex in examples:
        key = json.dumps(ex.prompt, sort_keys=True)
        groups.setdefault(key, []).append(ex)
        messages_of[key] = ex.prompt
    return groups, messages_of


def _split_prompts(cfg: DataConfig, fmt: ChatFormatter, messages_of: dict[str, list[dict]]) -> PromptSplit:
    """Split the distinct prompts in a seeded order: evaluation prompts first, then PPO prompts, the rest make RM pairs.

    A prompt over max_prompt_length is never a PPO/eval prompt; it falls to the RM side, where its pairs are dropped
    (counted).
    """
    n_eval, n_ppo = prompt_split_sizes(len(messages_of), cfg.n_eval_prompts, cfg.n_ppo_prompts)
    split = PromptSplit([], [], [], [])
    for key in seeded_order(list(messages_of), cfg.seed):
        if len(split.eval_prompts) < n_eval or len(split.ppo_prompts) < n_ppo:
            rec = prompt_record(prompt_id(messages_of[key]), messages_of[key], fmt)
            if len(rec["prompt_ids"]) <= cfg.max_prompt_length:
                (split.eval_prompts if len(split.eval_prompts) < n_eval else split.ppo_prompts).append(rec)
                split.prompt_only_keys.append(key)
                continue
        split.rm_keys.append(key)
    return split


def _fit_pair(cfg: DataConfig, fmt: ChatFormatter, sides: Sequence[tuple[list[int], str]]) -> list[tuple] | None:
    """Both responses of a pair fitted to max_response_length, [(ids, text, was_cut)] * 2; None if one is too long."""
    fitted = [fit_response(fmt, ids, text, cfg.max_response_length, cfg.truncate_responses) for ids, text in sides]
    return None if any(f is None for f in fitted) else fitted


def _rm_rows(rm_keys: Sequence[str], groups: dict[str, list[Example]]) -> Iterator[tuple[str, int, Example]]:
    """(key, index within its prompt, example) of every RM-side row, prompt by prompt in the split's order."""
    from tqdm.auto import tqdm

    for key in tqdm(rm_keys, desc="tokenising pairs", disable=len(rm_keys) < 2000):
        for j, ex in enumerate(groups[key]):
            yield key, j, ex


def _real_pairs(
    cfg: DataConfig,
    fmt: ChatFormatter,
    split: PromptSplit,
    groups: dict[str, list[Example]],
    messages_of: dict[str, list[dict]],
    dropped: Counter,
) -> tuple[dict[str, list[dict]], Counter, int]:
    """Tokenise the RM-side rows into pair records, up to max_pairs; (pairs by prompt key, truncated, rows unused).

    Rows are taken in order until max_pairs pairs are kept; every row after that is unused (not tokenised, not
    counted as dropped). Drops are counted in ``dropped`` by reason.
    """
    truncated: Counter = Counter()
    pairs_by_key: dict[str, list[dict]] = {}
    prompts: dict[str, dict] = {}  # prompt record of each RM key, tokenised at its first row
    n_pairs, rows_unused = 0, 0
    for key, j, ex in _rm_rows(split.rm_keys, groups):
        # The one max_pairs check: once the cap is reached, every remaining row is unused.
        if cfg.max_pairs and n_pairs >= cfg.max_pairs:
            rows_unused += 1
            continue
        if key not in prompts:
            prompts[key] = prompt_record(prompt_id(messages_of[key]), messages_of[key], fmt)
        prompt = prompts[key]
        if len(prompt["prompt_ids"]) > cfg.max_prompt_length:
            dropped["prompt_too_long"] += 1
            continue
        sides = [(fmt.response_ids(text, cfg.max_response_length), text) for text in (ex.chosen, ex.rejected)]
        fitted = _fit_pair(cfg, fmt, sides)
        if fitted is None:
            dropped["response_too_long"] += 1
            continue
        (c_ids, c_txt, c_cut), (r_ids, r_txt, r_cut) = fitted
        if c_ids == r_ids:
            dropped["identical_after_truncation"] += 1
            continue
        truncated.update({"chosen": int(c_cut), "rejected": int(r_cut)})
        rec = pair_record(
            f"{prompt['id']}-{j}", prompt, (c_ids, c_txt), (r_ids, r_txt), ex.score_chosen, ex.score_rejected
        )
        pairs_by_key.setdefault(key, []).append(rec)
        n_pairs += 1
    return pairs_by_key, truncated, rows_unused


def _split_real_pairs(
    rm_keys: Sequence[str], pairs_by_key: dict[str, list[dict]], eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """(train, eval) pairs: the pairs of a seeded share of the prompts are held out, in the RM prompts' order."""
    held_out = split_eval_prompts(list(pairs_by_key), eval_fraction, seed)
    train = [p for k in rm_keys if k in pairs_by_key and k not in held_out for p in pairs_by_key[k]]
    evals = [p for k in rm_keys if k in pairs_by_key and k in held_out for p in pairs_by_key[k]]
    return train, evals


def _top_up_ppo_prompts(ppo_prompts: list[dict], train: Sequence[dict], n_wanted: int) -> tuple[list[dict], int]:
    """PPO prompts topped up to ``n_wanted`` from RM *train* prompts (in pair order); (prompts, how many added)."""
    ppo_prompts = list(ppo_prompts)
    if len(ppo_prompts) >= n_wanted:
        return ppo_prompts, 0
    seen = {p["id"] for p in ppo_prompts}
    shared = 0
    for p in train:
        if len(ppo_prompts) >= n_wanted:
            break
        if p["prompt_id"] not in seen:
            seen.add(p["prompt_id"])
            ppo_prompts.append(
                {
                    "id": p["prompt_id"],
                    "prompt": p["prompt"],
                    "prompt_text": p["prompt_text"],
                    "prompt_ids": p["prompt_ids"],
                }
            )
            shared += 1
    return ppo_prompts, shared


def build_real(cfg: DataConfig, tokenizer) -> Built:
    """Load, normalise, split by prompt and tokenise a real preference dataset."""
    # 1. rows -> examples (malformed rows and empty/identical responses counted in `dropped`)
    raw, fmt_name, examples, dropped = _load_examples(cfg)
    fmt = ChatFormatter(tokenizer)
    # 2. group by prompt, and split the prompts: eval, PPO, RM
    groups, messages_of = _group_by_prompt(examples)
    split = _split_prompts(cfg, fmt, messages_of)
    # 3. RM-side rows -> tokenised pairs (up to max_pairs), then their prompts split into RM train / RM eval
    pairs_by_key, truncated, rm_rows_unused = _real_pairs(cfg, fmt, split, groups, messages_of, dropped)
    train, evals = _split_real_pairs(split.rm_keys, pairs_by_key, cfg.eval_fraction, cfg.seed)
    # 4. too few distinct prompts for disjoint PPO prompts: top up from RM train prompts, and say so
    ppo_prompts, shared = _top_up_ppo_prompts(split.ppo_prompts, train, cfg.n_ppo_prompts)
    info = {
        "source": raw.source,
        "format": fmt_name,
        "rows": len(raw.rows),
        "distinct_prompts": len(groups),
        "rows_not_used_for_pairs": sum(len(groups[k]) for k in split.prompt_only_keys) + rm_rows_unused,
        "ppo_prompts_shared_with_rm_train": shared,
    }
    if shared:
        _say(f"note: only {len(groups)} distinct prompts; {shared} PPO prompts are also RM training prompts")
    return Built(train, evals, ppo_prompts, split.eval_prompts, dropped, +truncated, Counter(), info)


def _shipped_samples(
    cfg: DataConfig, prompts: list[dict], texts: list[str]
) -> tuple[list[list[annotator.Sample]], dict[str, Any]]:
    """Responses for the RM prompts read from the shipped file (checked against the config and the prompt texts)."""
    path = annotator.SHIPPED_RESPONSES_PATH
    header, records = annotator.load_responses_file(path)
    wanted = {
        "prompt_set": annotator.PROMPT_SET_VERSION,
        "model": cfg.model,
        "max_new_tokens": cfg.generation_max_new_tokens,
        "temperature": cfg.generation_temperature,
        "samples_per_prompt": cfg.samples_per_prompt,
    }
    annotator.check_shipped_compatible(header, wanted, path)
    out = []
    for p, text in zip(prompts, texts):
        rec = records.get(p["id"])
        if rec is None:
            raise DataError(
                f"{path.name} has no responses for prompt {p['id']} (it covers {len(records)} prompts); "
                "lower n_rm_prompts or regenerate"
            )
        if rec["prompt_text"] != text:
            raise DataError(
                f"{path.name}: prompt {p['id']} was rendered differently when generated "
                "(tokenizer/chat template changed?); regenerate the file"
            )
        out.append(annotator.samples_from_record(rec)[: cfg.samples_per_prompt])
    _say(f"read {len(out) * cfg.samples_per_prompt:,} shipped responses ({path.name}, sha256 verified)")
    return out, {
        "responses": "shipped",
        "responses_file": path.name,
        "responses_sha256": annotator.sha256_file(path),
        "generation_header": header,
    }


def _sampled_samples(cfg: DataConfig, tokenizer, texts: list[str]) -> tuple[list[list[annotator.Sample]], dict]:
    """Responses for the RM prompts sampled now with the policy model (seeded per batch)."""
    import time

    from rlhf_lib.core import runtime
    from rlhf_lib.lm import models

    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    model = models.load_causal_lm(cfg.model, tokenizer, device).eval()
    t0 = time.time()
    out = annotator.generate_responses(
        model,
        tokenizer,
        texts,
        samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.generation_max_new_tokens,
        temperature=cfg.generation_temperature,
        batch_size=cfg.generation_batch_size,
        seed=cfg.seed,
        device=device,
        dtype=dtype,
    )
    seconds = time.time() - t0
    _say(
        f"sampled {len(out) * cfg.samples_per_prompt:,} responses in {seconds:.1f} s "
        f"({str(dtype).replace('torch.', '')})"
    )
    return out, {
        "responses": "sampled",
        "generation_seconds": round(seconds, 2),
        "generation_dtype": str(dtype).replace("torch.", ""),
    }


def _simulated_samples(
    cfg: DataConfig, tokenizer, fmt: ChatFormatter, prompts: list[dict]
) -> tuple[list[list[annotator.Sample]], dict[str, Any]]:
    """Responses for the RM prompts: from the shipped file, or sampled now with the policy model."""
    texts = [fmt.prompt_text(annotator.prompt_messages(p)) for p in prompts]
    if cfg.use_shipped_responses:
        return _shipped_samples(cfg, prompts, texts)
    return _sampled_samples(cfg, tokenizer, texts)


class Response(NamedTuple):
    """A response fitted to max_response_length: its token ids and text."""

    ids: list[int]
    text: str


class Candidate(NamedTuple):
    """A pair of two samples of one prompt, before the annotator orders it."""

    prompt: dict[str, Any]  # prompt record
    index: int  # pair index within the prompt (samples 2*index and 2*index + 1)
    a: Response
    b: Response


def _simulated_prompt_records(
    cfg: DataConfig, fmt: ChatFormatter, prompt_set: list[dict], split: str, n: int, prompts_dropped: Counter
) -> list[dict]:
    """Prompt records of the first ``n`` prompts of a split; those over max_prompt_length are skipped (counted)."""
    recs = []
    for p in annotator.select_prompts(prompt_set, split, n):
        rec = prompt_record(p["id"], annotator.prompt_messages(p), fmt)
        if len(rec["prompt_ids"]) > cfg.max_prompt_length:
            prompts_dropped["prompt_too_long"] += 1
            continue
        recs.append(rec)
    return recs


def _simulated_candidates(
    cfg: DataConfig,
    fmt: ChatFormatter,
    rm_prompts: list[dict],
    samples: list[list[annotator.Sample]],
    dropped: Counter,
    truncated: Counter,
) -> list[Candidate]:
    """Samples (0,1), (2,3), ... of each RM prompt as candidate pairs, fitted to the limits, up to max_pairs."""
    candidates: list[Candidate] = []
    for p, row in zip(rm_prompts, samples):
        prompt = prompt_record(p["id"], annotator.prompt_messages(p), fmt)
        if len(prompt["prompt_ids"]) > cfg.max_prompt_length:
            dropped["prompt_too_long"] += len(row) // 2
            continue
        for k in range(0, len(row) - 1, 2):
            fitted = _fit_pair(cfg, fmt, [(s.ids, s.text) for s in row[k : k + 2]])
            if fitted is None:
                dropped["response_too_long"] += 1
                continue
            (a_ids, a_txt, a_cut), (b_ids, b_txt, b_cut) = fitted
            if a_ids == b_ids:
                dropped["identical_responses"] += 1
                continue
            truncated.update({"responses": int(a_cut) + int(b_cut)})
            candidates.append(Candidate(prompt, k // 2, Response(a_ids, a_txt), Response(b_ids, b_txt)))
            # The one max_pairs check: stop at the cap (later prompts are neither read nor counted).
            if cfg.max_pairs and len(candidates) >= cfg.max_pairs:
                return candidates
    return candidates


def _labelled_pairs(
    candidates: Sequence[Candidate], gold_a: np.ndarray, gold_b: np.ndarray, a_first: np.ndarray, held_out: set[str]
) -> tuple[list[dict], list[dict]]:
    """(train, eval) pair records: each candidate ordered by its annotator label, held-out prompts' pairs to eval."""
    train, evals = [], []
    for c, ga, gb, first in zip(candidates, gold_a, gold_b, a_first):
        chosen, rejected, gc, gr = (c.a, c.b, ga, gb) if first else (c.b, c.a, gb, ga)
        rec = pair_record(
            f"{c.prompt['id']}-{c.index}", c.prompt, chosen, rejected, gold_chosen=float(gc), gold_rejected=float(gr)
        )
        (evals if c.prompt["id"] in held_out else train).append(rec)
    return train, evals


def build_simulated(cfg: DataConfig, tokenizer) -> Built:
    """Prompt set -> responses -> gold scores -> Bradley–Terry labels -> pairs split by prompt."""
    fmt = ChatFormatter(tokenizer)
    prompt_set = annotator.load_prompt_set()
    rm_prompts = annotator.select_prompts(prompt_set, "rm", cfg.n_rm_prompts)
    # 1. PPO and evaluation prompts (their own splits of the prompt set), then responses for the RM prompts
    prompts_dropped: Counter = Counter()
    ppo_prompts = _simulated_prompt_records(cfg, fmt, prompt_set, "ppo", cfg.n_ppo_prompts, prompts_dropped)
    eval_prompts = _simulated_prompt_records(cfg, fmt, prompt_set, "eval", cfg.n_eval_prompts, prompts_dropped)
    samples, info = _simulated_samples(cfg, tokenizer, fmt, rm_prompts)
    # 2. candidate pairs within the length limits
    dropped, truncated = Counter(), Counter()
    candidates = _simulated_candidates(cfg, fmt, rm_prompts, samples, dropped, truncated)
    # 3. hidden gold score of each response, Bradley–Terry label of each pair (True: a is chosen)
    gold = annotator.gold_scores([t for c in candidates for t in (c.a.text, c.b.text)])
    gold_a, gold_b = np.array(gold[0::2]), np.array(gold[1::2])
    a_first = annotator.bt_labels(gold_a, gold_b, cfg.annotator_beta, cfg.seed)
    # 4. labelled pairs, split by prompt into RM train / RM eval
    held_out = split_eval_prompts([c.prompt["id"] for c in candidates], cfg.eval_fraction, cfg.seed)
    train, evals = _labelled_pairs(candidates, gold_a, gold_b, a_first, held_out)
    finished = [s.finished for row in samples for s in row]
    info.update(
        {
            "source": f"prompt set {annotator.PROMPT_SET_VERSION} ({annotator.PROMPTS_PATH.name})",
            "format": "simulated",
            "annotator_beta": cfg.annotator_beta,
            "gold_ties": int(np.sum(gold_a == gold_b)),
            "gold_mean": float(np.mean(gold)) if gold else None,
            "gold_std": float(np.std(gold)) if gold else None,
            "eos_fraction": float(np.mean(finished)) if finished else None,
        }
    )
    return Built(train, evals, ppo_prompts, eval_prompts, dropped, +truncated, prompts_dropped, info)


# ----------------------------------------------------------------------------------------------------------------
# Statistics, outputs, the stage's public functions
# ----------------------------------------------------------------------------------------------------------------
def pair_metrics(pairs: Sequence[dict[str, Any]], simulated: bool) -> dict[str, float | None]:
    """label_gold_agreement and length_baseline_accuracy of a set of pairs.

    Length baseline: "the longer response is better", scored against the gold ordering for simulated data (gold ties
    skipped) and against the labels for real data.
    """
    if not pairs:
        return {"label_gold_agreement": None, "length_baseline_accuracy": None}
    lc = [len(p["chosen_ids"]) for p in pairs]
    lr = [len(p["rejected_ids"]) for p in pairs]
    if not simulated:
        return {"label_gold_agreement": None, "length_baseline_accuracy": annotator.length_baseline_accuracy(lc, lr)}
    gc = [p["gold_chosen"] for p in pairs]
    gr = [p["gold_rejected"] for p in pairs]
    better = [None if a == b else a > b for a, b in zip(gc, gr)]
    return {
        "label_gold_agreement": annotator.label_gold_agreement(gc, gr),
        "length_baseline_accuracy": annotator.length_baseline_accuracy(lc, lr, better),
    }


def load_split(run, name: str) -> list[dict[str, Any]]:
    """Rows of one output of the data stage: train_pairs, eval_pairs, ppo_prompts or eval_prompts."""
    path = Path(run.data_dir) / f"{name}.jsonl"
    if f"{name}.jsonl" not in OUTPUT_FILES:
        raise ValueError(f"unknown data split {name!r}; one of {[f[:-6] for f in OUTPUT_FILES]}")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the data stage (notebooks/01_data_prep.ipynb) first")
    return io.read_jsonl(path)


def pairs_frame(pairs: Sequence[dict[str, Any]], n: int | None = None, seed: int = 0):
    """A DataFrame view of pairs: the last user message, both responses, their lengths and scores."""
    import pandas as pd

    pairs = list(pairs)
    if n is not None and n < len(pairs):
        pairs = [pairs[i] for i in sorted(np.random.default_rng(seed).choice(len(pairs), n, replace=False))]
    rows = []
    for p in pairs:
        user = [m["content"] for m in p["prompt"] if m["role"] == "user"]
        rows.append(
            {
                "id": p["id"],
                "prompt": user[-1] if user else p["prompt_text"],
                "chosen": p["chosen"],
                "rejected": p["rejected"],
                "chosen_tokens": len(p["chosen_ids"]),
                "rejected_tokens": len(p["rejected_ids"]),
                "gold_chosen": p["gold_chosen"],
                "gold_rejected": p["gold_rejected"],
                "score_chosen": p["score_chosen"],
                "score_rejected": p["score_rejected"],
            }
        )
    return pd.DataFrame(rows).dropna(axis=1, how="all")  # real data has no gold, simulated data no scores


@dataclass
class DataReport:
    """What prepare_data did: summary.json numbers, drop/truncation reasons, the full report and sample pairs."""

    summary: dict[str, Any]
    dropped: dict[str, int]
    truncated: dict[str, int]
    report: dict[str, Any]
    samples: Any  # pandas DataFrame of a few train pairs

    def _repr_html_(self) -> str:
        import html

        def table(d: dict) -> str:
            rows = "".join(
                f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items()
            )
            return f"<table>{rows}</table>" if rows else "<p>none</p>"

        return (
            f"<h4>data stage summary</h4>{table(self.summary)}"
            f"<h4>dropped pairs (reason: count)</h4>{table(self.dropped)}"
            f"<h4>truncated responses</h4>{table(self.truncated)}<h4>sample pairs</h4>{self.samples.to_html()}"
        )

    def __repr__(self) -> str:
        return f"DataReport(summary={self.summary}, dropped={self.dropped}, truncated={self.truncated})"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _length_stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "mean": float(arr.mean()),
        "p50": float(np.median(arr)),
        "p95": float(np.percentile(arr, 95)),
        "max": int(arr.max()),
    }


def _check_built(cfg: DataConfig, built: Built) -> None:
    """Refuse a build with no training pairs, or no PPO / evaluation prompts where some were asked for."""
    where = built.info.get("source", cfg.dataset)
    if not built.train:
        raise DataError(
            f"{where}: no training pairs left after filtering (dropped: {dict(built.dropped)}); "
            "check the length limits and the data"
        )
    if cfg.n_ppo_prompts and not built.ppo_prompts:
        raise DataError(f"{where}: no PPO prompts left (prompts dropped: {dict(built.prompts_dropped)})")
    if cfg.n_eval_prompts and not built.eval_prompts:
        raise DataError(
            f"{where}: no evaluation prompts left (the dataset has too few distinct prompts or they are too long: "
            f"{dict(built.prompts_dropped)})"
        )


def _summary(built: Built, held: dict[str, float | None]) -> dict[str, Any]:
    """The stage's summary.json numbers (``held``: the metrics of the RM eval pairs)."""
    return {
        "n_train_pairs": len(built.train),
        "n_eval_pairs": len(built.eval),
        "n_ppo_prompts": len(built.ppo_prompts),
        "n_eval_prompts": len(built.eval_prompts),
        "n_dropped": int(sum(built.dropped.values())),
        "label_gold_agreement": held["label_gold_agreement"],
        "length_baseline_accuracy": held["length_baseline_accuracy"],
    }


def _report(
    cfg: DataConfig, tokenizer, built: Built, summary: dict[str, Any], held: dict, every: dict
) -> dict[str, Any]:
    """report.json: source, tokenizer and template, counts, drop/truncation reasons, limits, metrics, lengths."""
    from rlhf_lib.lm import models

    simulated = cfg.dataset == "simulated"
    all_pairs = built.train + built.eval
    fmt = ChatFormatter(tokenizer)
    responses = [p[k] for p in all_pairs for k in ("chosen_ids", "rejected_ids")]
    return {
        "dataset": cfg.dataset,
        "dataset_split": None if simulated else cfg.dataset_split,
        **built.info,
        "model": cfg.model,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "chat_template": "SIMPLE_CHAT_TEMPLATE"
        if tokenizer.chat_template == models.SIMPLE_CHAT_TEMPLATE
        else "tokenizer's own",
        "response_prefix": fmt.response_prefix,
        "gold_scorer": annotator.GOLD_SCORER if simulated else None,
        "counts": summary,
        "dropped_pairs": dict(built.dropped),
        "truncated_responses": dict(built.truncated),
        "dropped_prompts": dict(built.prompts_dropped),
        "limits": {
            "max_prompt_length": cfg.max_prompt_length,
            "max_response_length": cfg.max_response_length,
            "truncate_responses": cfg.truncate_responses,
        },
        "eval_pairs_metrics": held,
        "all_pairs_metrics": every,
        "finished_response_fraction": float(np.mean([bool(r) and r[-1] == tokenizer.eos_token_id for r in responses]))
        if responses
        else None,
        "prompt_tokens": _length_stats([len(p["prompt_ids"]) for p in all_pairs]),
        "response_tokens": _length_stats([len(r) for r in responses]),
        "overlap": _overlap(built),
    }


def _write_outputs(run, built: Built, report: dict[str, Any]) -> Path:
    """The four jsonl files and report.json in the run's data folder; returns the folder."""
    data_dir = Path(run.data_dir)
    for name, rows in zip(OUTPUT_FILES, (built.train, built.eval, built.ppo_prompts, built.eval_prompts)):
        io.write_jsonl(data_dir / name, rows)
    io.write_json_atomic(data_dir / "report.json", report)
    return data_dir


def prepare_data(cfg: DataConfig, run) -> DataReport:
    """Build and write the stage's four jsonl files and report.json; return what a notebook shows."""
    from rlhf_lib.lm import models

    # 1. build the pairs and prompts in memory, refuse an unusable result before writing anything
    tokenizer = models.load_tokenizer(cfg.model)
    simulated = cfg.dataset == "simulated"
    built = build_simulated(cfg, tokenizer) if simulated else build_real(cfg, tokenizer)
    _check_built(cfg, built)
    # 2. metrics of the RM eval pairs (the summary's) and of all pairs, the summary and the report
    held = pair_metrics(built.eval, simulated)
    every = pair_metrics(built.train + built.eval, simulated)
    summary = _summary(built, held)
    report = _report(cfg, tokenizer, built, summary, held, every)
    # 3. write, say what was written
    data_dir = _write_outputs(run, built, report)
    _say(
        f"wrote {summary['n_train_pairs']} train / {summary['n_eval_pairs']} eval pairs, "
        f"{summary['n_ppo_prompts']} PPO / "
        f"{summary['n_eval_prompts']} eval prompts to {data_dir}; dropped {dict(built.dropped) or 'none'}; "
        f"truncated {dict(built.truncated) or 'none'}"
    )
    return DataReport(
        summary,
        dict(built.dropped),
        dict(built.truncated),
        report,
        pairs_frame(built.train, n=min(5, len(built.train)), seed=cfg.seed),
    )


def _overlap(built: Built) -> dict[str, int]:
    """Prompts shared between the outputs (by prompt text); eval prompts must share none."""
    train = {p["prompt_text"] for p in built.train}
    held = {p["prompt_text"] for p in built.eval}
    ppo = {p["prompt_text"] for p in built.ppo_prompts}
    ev = {p["prompt_text"] for p in built.eval_prompts}
    return {
        "rm_train_and_rm_eval": len(train & held),
        "ppo_and_rm": len(ppo & (train | held)),
        "eval_prompts_and_rm": len(ev & (train | held)),
        "eval_prompts_and_ppo": len(ev & ppo),
    }


def sample_pairs(run, n: int = 5, split: str = "train_pairs", seed: int = 0) -> "pandas.DataFrame":  # noqa: F821
    """A DataFrame of ``n`` random pairs of a written split (for a look at the data)."""
    return pairs_frame(load_split(run, split), n=n, seed=seed)
