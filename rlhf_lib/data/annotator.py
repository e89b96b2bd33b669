"""Offline simulated annotator: a shipped prompt set, responses sampled from the policy model, a hidden gold score
(VADER sentiment) and Bradley–Terry labels.

Why VADER sentiment as the gold score (of the candidates tried): on review/description
prompts it varies between two samples of the same prompt, a length-only predictor explains little of it, and a
135M reward model learns it; the alternative rubric (finish/length/repetition) was mostly a length signal.

Prompt set (``assets/prompts_v1.jsonl``, version ``v1``): 2,000 prompts written for this task, 20 categories x 20
subjects x 5 templates ("Write a short review of <subject> in two or three sentences.", "Describe <subject> in two
or three sentences.", ...). Each *subject* belongs to one split (per category: 14 rm, 4 ppo, 2 eval subjects), so
RM, PPO and evaluation prompts never share a prompt nor even a subject: 1,400 rm, 400 ppo, 200 eval prompts.

Shipped responses (``assets/responses_v1_smollm2.jsonl.gz`` + ``.sha256``): 2 samples for each of the 1,400 rm
prompts from ``bundled:smollm2-135m-instruct``, because sampling them takes longer on a 2-core CPU than the whole
pipeline budget. The checksum is verified on load. Regenerate (and re-checksum) them with::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m rlhf_lib.data.annotator --regenerate \
        --model bundled:smollm2-135m-instruct --n-prompts 1400 --samples-per-prompt 2 \
        --max-new-tokens 128 --temperature 0.8 --batch-size 32 --seed 0 --threads 2

Sampling is pure (top_k=0, top_p=1) at the given temperature, batched and left-padded, under bf16 autocast where
``runtime.pick_dtype`` chooses it; each batch reseeds torch from (seed, batch index), so an interrupted regeneration
resumes from its ``.partial`` file with the same result. Bit-identical output needs the same torch build, thread
count and CPU (bf16 kernels differ between machines); the statistics below should hold anywhere.

Measured on the shipped file (``python -m rlhf_lib.data.annotator --stats``; 1,400 pairs = the two samples of each rm
prompt; beta = 4, seed 0):

    gold (VADER compound) mean +- std    0.60 +- 0.44 (range [-1, 1]); mean |gold gap| within a pair 0.41
    gold ties within a pair              1.9 % (26 pairs; kept, the annotator flips a coin); identical pairs 0
    length-only accuracy vs gold         0.60 (all pairs), 0.62 (the 210 held-out pairs of the default split)
    BT label agreement with gold         0.74 (all pairs), 0.75 (held-out pairs)
    responses ending in EOS              73 % (median 58 tokens among finished ones; 27 % cut at 128 tokens)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
PROMPT_SET_VERSION = "v1"
PROMPTS_PATH = ASSETS_DIR / f"prompts_{PROMPT_SET_VERSION}.jsonl"
SHIPPED_RESPONSES_PATH = ASSETS_DIR / f"responses_{PROMPT_SET_VERSION}_smollm2.jsonl.gz"
PROMPT_SPLITS = ("rm", "ppo", "eval")
GOLD_SCORER = "vader"  # recorded in the data stage's report.json


# ----------------------------------------------------------------------------------------------------------------
# Prompt set
# ----------------------------------------------------------------------------------------------------------------
def load_prompt_set(path: str | Path = PROMPTS_PATH) -> list[dict[str, Any]]:
    """The shipped prompt set: one dict per prompt (id, category, subject, template, text, split)."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("id", "text", "split", "subject"):
                if not isinstance(row.get(key), str) or not row[key]:
                    raise ValueError(f"{path} line {line_no}: field {key!r} must be a non-empty string")
            if row["split"] not in PROMPT_SPLITS:
                raise ValueError(f"{path} line {line_no}: split {row['split']!r} is not one of {PROMPT_SPLITS}")
            rows.append(row)
    return rows


def select_prompts(prompt_set: Sequence[dict[str, Any]], split: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` prompts of one split (the file order is already shuffled once, so any prefix is mixed)."""
    pool = [p for p in prompt_set if p["split"] == split]
    if n > len(pool):
        raise ValueError(
            f"asked for {n} {split!r} prompts but the prompt set {PROMPT_SET_VERSION} has {len(pool)}; "
            f"lower the matching n_*_prompts setting"
        )
    return pool[:n]


def prompt_messages(prompt: dict[str, Any]) -> list[dict[str, str]]:
    """A prompt of the set as chat messages (a single user turn)."""
    return [{"role": "user", "content": prompt["text"]}]


# ----------------------------------------------------------------------------------------------------------------
# Gold score and Bradley–Terry labels
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # ships its lexicon, no download

    return SentimentIntensityAnalyzer()


def gold_scores(texts: Iterable[str]) -> list[float]:
    """Hidden gold score of each response: VADER compound sentiment in [-1, 1] (higher = more positive)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def bt_probability(gold_a: np.ndarray, gold_b: np.ndarray, beta: float) -> np.ndarray:
    """P(a preferred over b) = sigmoid(beta * (gold_a - gold_b)) (Bradley & Terry 1952, as in Ouyang et al. 2022)."""
    x = beta * (np.asarray(gold_a, float) - np.asarray(gold_b, float))
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = sigmoid(x), without overflow for large beta


def bt_labels(gold_a: Sequence[float], gold_b: Sequence[float], beta: float, seed: int) -> np.ndarray:
    """Simulated annotator: True where response a is chosen, drawn from the Bradley–Terry probability."""
    p = bt_probability(np.asarray(gold_a), np.asarray(gold_b), beta)
    return np.random.default_rng(seed).random(p.shape) < p


def label_gold_agreement(gold_chosen: Sequence[float], gold_rejected: Sequence[float]) -> float | None:
    """Fraction of pairs whose chosen response has the higher gold score, over pairs without a gold tie."""
    gc, gr = np.asarray(gold_chosen, float), np.asarray(gold_rejected, float)
    decided = gc != gr
    return float(np.mean(gc[decided] > gr[decided])) if decided.any() else None


def length_baseline_accuracy(
    len_chosen: Sequence[int], len_rejected: Sequence[int], better_chosen: Sequence[bool] | None = None
) -> float | None:
    """Accuracy of "the longer response is better" (equal lengths count 1/2) against a reference ordering.

    ``better_chosen[i]`` says whether the reference (gold for simulated data, the label otherwise) prefers the chosen
    response; pairs where it is None are skipped. Default: the label, i.e. chosen is better.
    """
    lc, lr = np.asarray(len_chosen, float), np.asarray(len_rejected, float)
    ref = np.ones(len(lc), dtype=object) if better_chosen is None else np.asarray(better_chosen, dtype=object)
    keep = np.array([r is not None for r in ref], dtype=bool)
    if not keep.any():
        return None
    ref_b = ref[keep].astype(bool)
    lc, lr = lc[keep], lr[keep]
    score = np.where(lc == lr, 0.5, ((lc > lr) == ref_b).astype(float))
    return float(score.mean())


# ----------------------------------------------------------------------------------------------------------------
# Response sampling
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One sampled response: its token ids (ending in EOS iff it finished) and decoded text."""

    ids: list[int]
    text: str
    finished: bool


def cut_at_eos(ids: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; (ids, finished)."""
    ids = list(ids)
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1], True
    return ids, False


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of one generation batch, so batches are independent of each other (resumable, order-free)."""
    return (seed * 1_000_003 + batch_index) % (2**63 - 1)


def generate_batch(
    model,
    tokenizer,
    prompt_texts: Sequence[str],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    device,
    dtype,
    seed: int,
) -> list[list[Sample]]:
    """Sample ``samples_per_prompt`` responses for each prompt text in one left-padded generate() call."""
    import torch
    from transformers import GenerationConfig

    from rlhf_lib.core.runtime import autocast

    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer (models.load_tokenizer gives one)")
    enc = tokenizer(list(prompt_texts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    gen_cfg = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,  # pure sampling
        max_new_tokens=max_new_tokens,
        num_return_sequences=samples_per_prompt,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    with torch.no_grad(), autocast(device, dtype):
        out = model.generate(**enc, generation_config=gen_cfg)  # (B * samples, prompt_len + new)
    new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
    results: list[list[Sample]] = []
    for i in range(len(prompt_texts)):
        row = []
        for j in range(samples_per_prompt):
            ids, finished = cut_at_eos(new_tokens[i * samples_per_prompt + j], tokenizer.eos_token_id)
            text = tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True)
            row.append(Sample(ids=ids, text=text, finished=finished))
        results.append(row)
    return results


def generate_responses(
    model,
    tokenizer,
    prompt_texts: Sequence[str],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    device,
    dtype,
    done: dict[int, list[Sample]] | None = None,
    on_batch=None,
    progress: bool = True,
) -> list[list[Sample]]:
    """Sample responses for every prompt, ``batch_size`` prompts per generate() call.

    ``done`` maps batch index -> samples already generated (resume); ``on_batch(index, start, samples)`` is called
    after each new batch (used to write the resume file).
    """
    from tqdm.auto import tqdm

    done = dict(done or {})
    n_batches = math.ceil(len(prompt_texts) / batch_size)
    results: list[list[Sample]] = []
    bar = tqdm(range(n_batches), desc="sampling responses", disable=not progress)
    for b in bar:
        start = b * batch_size
        chunk = prompt_texts[start : start + batch_size]
        if b in done:
            samples = done[b]
        else:
            samples = generate_batch(
                model,
                tokenizer,
                chunk,
                samples_per_prompt,
                max_new_tokens,
                temperature,
                device,
                dtype,
                batch_seed(seed, b),
            )
            if on_batch is not None:
                on_batch(b, start, samples)
        results.extend(samples)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Shipped responses file
# ----------------------------------------------------------------------------------------------------------------
# Settings that must match between a shipped file and a config that wants to use it.
GENERATION_KEYS = ("prompt_set", "model", "max_new_tokens", "temperature")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_responses_file(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Write a gzip jsonl (header line, then one record per prompt) reproducibly, plus its .sha256; returns the sha."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:  # mtime=0: stable sha
        gz.write((json.dumps({"kind": "header", **header}) + "\n").encode())
        for rec in records:
            gz.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    digest = sha256_file(path)
    sha_path(path).write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    return digest


def load_responses_file(path: Path = SHIPPED_RESPONSES_PATH) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read a responses file after checking its sha256; returns (header, prompt id -> record)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"shipped responses {path} are missing; regenerate them (see rlhf_lib/data/annotator.py's docstring) "
            f"or set use_shipped_responses: false to sample them during the data stage"
        )
    expected_file = sha_path(path)
    if not expected_file.exists():
        raise FileNotFoundError(f"{expected_file} (the checksum of {path.name}) is missing")
    expected = expected_file.read_text(encoding="utf-8").split()[0]
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"{path} is corrupted or was edited: sha256 {actual} != {expected} recorded in {expected_file.name}. "
            f"Restore it from git or regenerate it (see rlhf_lib/data/annotator.py's docstring)"
        )
    header: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            row = json.loads(line)
            if line_no == 1:
                if row.get("kind") != "header":
                    raise ValueError(f"{path}: first line must be the header")
                header = row
            else:
                records[row["prompt_id"]] = row
    return header, records


def check_shipped_compatible(header: dict[str, Any], wanted: dict[str, Any], source: Path) -> None:
    """Refuse a shipped file whose generation settings differ from the config's (they would be silently ignored)."""
    diffs = [
        f"{k}: file {header.get(k)!r} vs config {wanted[k]!r}" for k in GENERATION_KEYS if header.get(k) != wanted[k]
    ]
    if wanted["samples_per_prompt"] > header.get("samples_per_prompt", 0):
        diffs.append(
            f"samples_per_prompt: file {header.get('samples_per_prompt')} < config {wanted['samples_per_prompt']}"
        )
    if diffs:
        raise ValueError(
            f"the shipped responses {source.name} were generated with other settings ({'; '.join(diffs)}). Set "
            f"use_shipped_responses: false to sample responses in the data stage, or change the settings back"
        )


# ----------------------------------------------------------------------------------------------------------------
# Statistics of a set of pairs (used by the data stage and by --stats)
# ----------------------------------------------------------------------------------------------------------------
def pair_statistics(pairs_samples: Sequence[tuple[Sample, Sample]], beta: float, seed: int) -> dict[str, Any]:
    """Gold mean/std, tie rate, length-only accuracy, BT label agreement, EOS fraction of (a, b) response pairs."""
    a_txt = [a.text for a, _ in pairs_samples]
    b_txt = [b.text for _, b in pairs_samples]
    ga, gb = np.array(gold_scores(a_txt)), np.array(gold_scores(b_txt))
    la = np.array([len(a.ids) for a, _ in pairs_samples])
    lb = np.array([len(b.ids) for _, b in pairs_samples])
    first = bt_labels(ga, gb, beta, seed)
    gc, gr = np.where(first, ga, gb), np.where(first, gb, ga)
    gold_both = np.concatenate([ga, gb])
    better_a = [None if x == y else bool(x > y) for x, y in zip(ga, gb)]
    finished = [s.finished for pair in pairs_samples for s in pair]
    return {
        "n_pairs": len(pairs_samples),
        "gold_mean": float(gold_both.mean()),
        "gold_std": float(gold_both.std()),
        "gold_tie_rate": float(np.mean(ga == gb)),
        "identical_rate": float(np.mean([a.ids == b.ids for a, b in pairs_samples])),
        "length_baseline_accuracy": length_baseline_accuracy(la, lb, better_a),
        "label_gold_agreement": label_gold_agreement(gc, gr),
        "eos_fraction": float(np.mean(finished)),
        "mean_response_tokens": float(np.mean(np.concatenate([la, lb]))),
        "abs_gold_gap_mean": float(np.mean(np.abs(ga - gb))),
    }


def samples_from_record(rec: dict[str, Any]) -> list[Sample]:
    return [Sample(ids=r["ids"], text=r["text"], finished=r["finished"]) for r in rec["responses"]]


# ----------------------------------------------------------------------------------------------------------------
# Command line: regenerate the shipped responses, or print their statistics
# ----------------------------------------------------------------------------------------------------------------
def _regenerate_header(args: argparse.Namespace, dtype) -> dict[str, Any]:
    """Header of a regenerated responses file: the generation settings, dtype, threads, torch and the command."""
    import torch

    return {
        "prompt_set": PROMPT_SET_VERSION,
        "model": args.model,
        "n_prompts": args.n_prompts,
        "samples_per_prompt": args.samples_per_prompt,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": "python -m rlhf_lib.data.annotator " + " ".join(sys.argv[1:]),
    }


def _resume_partial(partial: Path, header: dict[str, Any]) -> dict[int, list[list[Sample]]]:
    """Batches already in the ``.partial`` file, by batch index, if it was written with the same settings.

    The partial file holds the header and one line per finished batch. One written with other settings (threads and
    command aside) is discarded; a new one is started with ``header``.
    """
    done: dict[int, list[list[Sample]]] = {}
    if partial.exists():
        with open(partial, encoding="utf-8") as f:
            lines = [json.loads(x) for x in f if x.strip()]
        old = {k: v for k, v in lines[0].items() if k not in ("command", "threads")} if lines else {}
        if old == {k: v for k, v in header.items() if k not in ("command", "threads")}:
            for rec in lines[1:]:
                done[rec["batch"]] = [[Sample(**s) for s in row] for row in rec["samples"]]
            print(f"resuming: {len(done)} batches already in {partial}", flush=True)
        else:
            partial.unlink()
    if not partial.exists():
        partial.write_text(json.dumps(header) + "\n", encoding="utf-8")
    return done


def _partial_writer(partial: Path, t0: float, n_batches: int):
    """on_batch callback of generate_responses: append the batch to the partial file, print its progress."""

    def on_batch(b: int, start: int, samples: list[list[Sample]]) -> None:
        with open(partial, "a", encoding="utf-8") as f:
            f.write(json.dumps({"batch": b, "samples": [[s.__dict__ for s in row] for row in samples]}) + "\n")
        fin = np.mean([s.finished for row in samples for s in row])
        print(f"[{time.time() - t0:7.1f}s] batch {b + 1}/{n_batches} done (EOS {fin:.2f})", flush=True)

    return on_batch


def _regenerate(args: argparse.Namespace) -> None:
    """Sample the responses file again (resuming from its partial file), write it with its checksum, print stats."""
    from rlhf_lib.core import runtime
    from rlhf_lib.lm import models

    # 1. device, prompts, policy model, and the prompts as the chat template renders them
    runtime.set_threads(args.threads)
    device = runtime.pick_device(args.device)
    dtype = runtime.pick_dtype(args.dtype, device)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial.jsonl")
    prompts = select_prompts(load_prompt_set(), "rm", args.n_prompts)
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_causal_lm(args.model, tokenizer, device).eval()
    texts = [
        tokenizer.apply_chat_template(prompt_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    # 2. resume the batches a previous run with the same settings finished
    header = _regenerate_header(args, dtype)
    done = _resume_partial(partial, header)
    # 3. sample the remaining batches, each appended to the partial file as it finishes
    t0 = time.time()
    samples = generate_responses(
        model,
        tokenizer,
        texts,
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        dtype=dtype,
        done=done,
        on_batch=_partial_writer(partial, t0, math.ceil(len(texts) / args.batch_size)),
        progress=False,
    )
    header["generation_seconds_this_run"] = round(time.time() - t0, 1)
    # 4. write the file and its checksum, drop the partial file, print the statistics
    records = [
        {"prompt_id": p["id"], "prompt_text": t, "responses": [s.__dict__ for s in row]}
        for p, t, row in zip(prompts, texts, samples)
    ]
    digest = write_responses_file(out, header, records)
    partial.unlink()
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, sha256 {digest})", flush=True)
    _print_stats(out, beta=args.beta, seed=args.seed)


def _print_stats(path: Path, beta: float, seed: int) -> dict[str, Any]:
    header, records = load_responses_file(path)
    pairs = []
    for rec in records.values():
        s = samples_from_record(rec)
        pairs.extend((s[i], s[i + 1]) for i in range(0, len(s) - 1, 2))
    stats = pair_statistics(pairs, beta=beta, seed=seed)
    stats["generation_seconds"] = header.get("generation_seconds_this_run")
    stats["beta"] = beta
    print(json.dumps(stats, indent=2))
    return stats


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_lib.data.annotator", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--regenerate", action="store_true", help="sample the shipped responses again")
    mode.add_argument("--stats", action="store_true", help="print the statistics of a responses file")
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--n-prompts", type=int, default=1400, help="rm prompts of the prompt set to answer")
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--beta", type=float, default=4.0, help="Bradley–Terry beta used by --stats")
    parser.add_argument("--out", default=str(SHIPPED_RESPONSES_PATH))
    args = parser.parse_args(argv)
    if args.regenerate:
        _regenerate(args)
    else:
        _print_stats(Path(args.out), beta=args.beta, seed=args.seed)


if __name__ == "__main__":
    main()
