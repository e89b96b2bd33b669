"""The reference policy's samples on the held-out prompts and their scores: computed once per inputs, then reused.

Every evaluation samples the reference (the untrained ``common.model``) on the held-out prompts with the evaluation
seed and scores the samples: the evaluation stage, its over-optimisation curve, the methods comparison, and each run
that shares a base run (``common.base_run``), so every point of a sweep. :func:`cached_reference_samples` keeps the
samples and their reward-model and gold scores in ``<owner>/eval_cache/<key>.json``, where the owner is the run whose
reward model scores them (``run.upstream("reward_model")``: the base run when there is one), so all the runs on one
base read one file.

The key is exact: the sha256 of canonical JSON of everything the samples and scores depend on (:func:`cache_key`):
the reference model (its reference string and a sha256 of every file of the folder it resolves to), the prompt token
ids, every sampling setting (:meth:`GenerationSettings.to_dict`: response length, temperature, batch size, seed,
device, dtype), the reward model (the sha256 of its run's reward_model stage, :func:`rlhf_lib.core.runs.stage_hash`,
the hash a run on a base records in its manifest), the gold scorer's name, the environment that could change a
sampled token or a score (torch / transformers / tokenizers versions, the GPU or CPU model, torch's float32 matmul
precision and, on a CPU, its thread count) and the format version of the file. An entry is reused only where
sampling again would draw the same tokens.

The curve's prompts are a prefix of the evaluation's, but their samples are not the first rows of the full list's:
``sample_policy`` draws one random stream per batch, from the seed, so a row's sample depends on the rows batched
before it. The prefix is its own entry, under its own key.

Only the run's own scorers are known by content: an evaluation given other scorers (the ``rm_scorer`` /
``gold_scorer`` arguments of the stage functions) samples the reference afresh each time. A file that cannot be read
or does not hold what its key says is reported in one line, recomputed and replaced; a write that fails (a read-only
base run) is reported and only costs the reuse.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from rlhf_lib.core import runtime
from rlhf_lib.core.io import write_text_atomic
from rlhf_lib.core.runs import Run, stage_hash
from rlhf_lib.evaluate.sampling import (
    GenerationSettings,
    GoldScorer,
    RMScorer,
    Samples,
    sample_policy,
    score_samples,
)
from rlhf_lib.lm import models

CACHE_FORMAT = 1  # bump when what a cache file holds, or how the samples are drawn or scored, changes
CACHE_DIR = "eval_cache"  # <owner run>/eval_cache/<key>.json
# Packages whose version can change a sampled token, a decoded text or a reward-model score.
KEY_PACKAGES = ("torch", "transformers", "tokenizers")
GOLD_PACKAGES = {"vader": "vaderSentiment"}  # gold scorer name -> the package that computes it


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal text for equal data, whatever the key order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(
    reference: dict[str, Any],
    prompt_ids: Sequence[Sequence[int]],
    generation: dict[str, Any],
    reward_model: str,
    gold_scorer: str | None,
    environment: dict[str, Any],
    version: int = CACHE_FORMAT,
) -> str:
    """sha256 (hex) of canonical JSON of every input of the reference's samples and scores."""
    inputs = {
        "version": version,
        "reference": reference,
        "prompt_ids": [[int(t) for t in p] for p in prompt_ids],
        "generation": generation,
        "reward_model": reward_model,
        "gold_scorer": gold_scorer,
        "environment": environment,
    }
    return hashlib.sha256(canonical_json(inputs).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# content hashes of model folders

_DIGESTS: dict[tuple[Any, ...], str] = {}  # this process's folder hashes, by the folder's file list and stats
SETTLED_NS = 5 * 10**9  # a file last written this long before a hash began cannot change under the same mtime


def _listing(folder: Path) -> tuple[tuple[str, int, int, int], ...]:
    """(relative path, size, mtime, inode) of every file under ``folder``, sorted by path."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        out.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _memo(kind: str, folder: Path, compute) -> str:
    """``compute()``, once per process for a folder whose files (names, sizes, mtimes, inodes) are unchanged: the
    evaluation and its curve hash the same folders. A file rewritten in place gets a later mtime, except within the
    file system's timestamp granularity of its last write, so a hash is kept only when every file was last written
    well before the hash began."""
    listing = _listing(folder)
    memo_key = (kind, str(folder.resolve()), listing)
    if memo_key in _DIGESTS:
        return _DIGESTS[memo_key]
    began = time.time_ns()
    digest = compute()
    if all(mtime < began - SETTLED_NS for _, _, mtime, _ in listing):
        _DIGESTS[memo_key] = digest
    return digest


def folder_sha256(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``folder``, in sorted order."""
    folder = Path(folder)

    def compute() -> str:
        digest = hashlib.sha256()
        for name, *_ in _listing(folder):
            digest.update(name.encode() + b"\0")
            with open(folder / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
        return digest.hexdigest()

    return _memo("folder", folder, compute)


def reward_model_sha256(owner: Run) -> str:
    """sha256 of the owner run's reward_model stage outputs (:func:`rlhf_lib.core.runs.stage_hash`)."""
    return _memo("reward_model", owner.reward_model_dir, lambda: stage_hash(owner, "reward_model"))


def model_folder(ref: str) -> Path | None:
    """The local folder a model reference loads from: bundled / tiny models and folders as resolved, a hub id's
    cached snapshot; None when there is none."""
    resolved = Path(models.resolve_model_ref(ref))
    if resolved.is_dir():
        return resolved
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except (OSError, ValueError):  # not downloaded, or not a hub id: no local copy to hash
        return None


def environment() -> dict[str, Any]:
    """Package versions and settings of this process that can change a sampled token or a score (the hardware is
    :func:`hardware`, of the evaluation's device)."""
    env: dict[str, Any] = {}
    for name in KEY_PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return env


def hardware(device: torch.device) -> dict[str, Any]:
    """The GPU's name, or the CPU's model and torch's thread count (a CPU's float sums follow its thread split)."""
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device)}
    return {"cpu": runtime.cpu_info()[0], "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------------
# the cache of one evaluation context


@dataclass(frozen=True)
class ReferenceCache:
    """Where one run's reference samples are kept, and the inputs of their key that the prompts and sampling settings
    do not give."""

    folder: Path  # <owner run>/eval_cache
    reference: dict[str, Any]  # {"model": reference string, "sha256": of the files of its folder}
    reward_model: str  # sha256 of the owner run's reward_model stage (":<combination>" for an ensemble combined)
    gold_scorer: str | None  # the data stage's gold scorer name; None: no gold
    environment: dict[str, Any]

    def key(self, prompt_ids: Sequence[Sequence[int]], settings: GenerationSettings) -> str:
        env = {**self.environment, **hardware(settings.device)}
        return cache_key(self.reference, prompt_ids, settings.to_dict(), self.reward_model, self.gold_scorer, env)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"


def reference_cache_for(
    model_ref: str, owner: Run, gold_scorer: str | None, reward: str = "model"
) -> ReferenceCache | None:
    """The cache of evaluations of ``model_ref`` scored by ``owner``'s reward model (as ``reward``: the saved model,
    or its ensemble combined) and the ``gold_scorer`` named by the data; None (with one line saying why) when the
    reference has no local folder to hash."""
    folder = model_folder(model_ref)
    if folder is None:
        print(f"[eval] reference samples not cached: {model_ref!r} has no local folder to hash")
        return None
    env = environment()
    if gold_scorer is not None:
        package = GOLD_PACKAGES.get(gold_scorer)
        try:
            env["gold_package"] = [package, metadata.version(package)] if package else None
        except metadata.PackageNotFoundError:
            env["gold_package"] = [package, None]
    return ReferenceCache(
        folder=owner.root / CACHE_DIR,
        reference={"model": model_ref, "sha256": folder_sha256(folder)},
        reward_model=reward_model_sha256(owner) + ("" if reward == "model" else f":{reward}"),
        gold_scorer=gold_scorer,
        environment=env,
    )


class ReferenceContext(Protocol):
    """What the reference's samples are drawn and scored with: :class:`rlhf_lib.evaluate.stage.EvalContext`."""

    settings: GenerationSettings
    tokenizer: Any
    reference: torch.nn.Module
    rm_scorer: RMScorer
    gold_scorer: GoldScorer | None
    reference_cache: ReferenceCache | None


class ReferenceSamples(NamedTuple):
    """The reference's samples, their reward-model and gold scores, and whether they were read from the cache."""

    samples: Samples
    rm: np.ndarray
    gold: np.ndarray | None
    cached: bool


def _record(key: str, samples: Samples, rm: np.ndarray, gold: np.ndarray | None) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "key": key,
        "prompt_ids": samples.prompt_ids,
        "response_ids": samples.response_ids,
        "texts": samples.texts,
        "contains_eos": samples.contains_eos.astype(bool).tolist(),
        "kl": samples.kl.tolist(),
        "rm": rm.tolist(),
        "gold": None if gold is None else gold.tolist(),
    }


def _from_record(
    record: Any, key: str, prompts: list[list[int]], has_gold: bool
) -> tuple[Samples, np.ndarray, np.ndarray | None]:
    """The samples and scores of a cache record; ValueError unless it is whole and is the entry of ``key``."""
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("key") != key:
        raise ValueError("not the entry of its key")
    if record["prompt_ids"] != prompts:
        raise ValueError("its prompts differ")
    n = len(prompts)
    response_ids, texts = record["response_ids"], record["texts"]
    if not (isinstance(response_ids, list) and isinstance(texts, list)) or len(response_ids) != n or len(texts) != n:
        raise ValueError(f"not {n} responses")
    if not all(isinstance(r, list) and all(isinstance(t, int) for t in r) for r in response_ids):
        raise ValueError("a response is not a list of token ids")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("a text is not a string")
    eos = np.asarray(record["contains_eos"], dtype=bool)
    kl = np.asarray(record["kl"], dtype=np.float64)
    rm = np.asarray(record["rm"], dtype=np.float64)
    gold = None if record["gold"] is None else np.asarray(record["gold"], dtype=np.float64)
    if (gold is not None) != has_gold:
        raise ValueError("its gold scores do not match the gold scorer")
    for name, arr in (("contains_eos", eos), ("kl", kl), ("rm", rm), ("gold", gold)):
        if arr is not None and arr.shape != (n,):
            raise ValueError(f"{name} has shape {arr.shape}, not ({n},)")
    samples = Samples(prompt_ids=prompts, response_ids=response_ids, texts=texts, contains_eos=eos, kl=kl)
    return samples, rm, gold


def cached_reference_samples(
    ctx: ReferenceContext, prompts: Sequence[Sequence[int]], desc: str = "reference"
) -> ReferenceSamples:
    """The reference's samples on ``prompts`` at ``ctx.settings`` and their scores: read from the cache when an entry
    for their key exists, else sampled, scored and written (atomically) for the next evaluation."""
    prompts = [list(p) for p in prompts]
    cache = ctx.reference_cache
    path = None
    if cache is not None:
        key = cache.key(prompts, ctx.settings)
        path = cache.path(key)
        if path.exists():
            try:
                with open(path, encoding="utf-8") as f:
                    record = json.load(f)
                samples, rm, gold = _from_record(record, key, prompts, ctx.gold_scorer is not None)
                print(f"[eval] {desc}: samples and scores read from {path}")
                return ReferenceSamples(samples, rm, gold, True)
            except (OSError, ValueError, KeyError, TypeError) as err:
                print(f"[eval] {desc}: ignoring unreadable cache file {path} ({type(err).__name__}: {err}); resampling")
    samples = sample_policy(ctx.reference, ctx.tokenizer, prompts, ctx.settings, desc=desc)
    rm, gold = score_samples(samples, ctx.rm_scorer, ctx.gold_scorer)
    if path is not None:
        try:
            write_text_atomic(path, canonical_json(_record(path.stem, samples, rm, gold)) + "\n")
        except (OSError, ValueError) as err:  # a read-only base run, or a score JSON cannot hold (nan)
            print(f"[eval] {desc}: could not write {path} ({type(err).__name__}: {err}); not cached")
    return ReferenceSamples(samples, rm, gold, False)


__all__ = [
    "CACHE_DIR",
    "CACHE_FORMAT",
    "ReferenceCache",
    "ReferenceContext",
    "ReferenceSamples",
    "cache_key",
    "cached_reference_samples",
    "folder_sha256",
    "reference_cache_for",
    "reward_model_sha256",
]
