"""PPO vs best-of-N vs DPO vs RLOO vs GRPO on one run's data, reward model and gold: one KL–gold frontier.

``python -m rlhf_lib.compare --params params/compare/<profile>.yaml --base-run <run>`` (``make compare``) runs the
profile's methods on top of a finished run (its data/ and reward_model/ are read, never written) and executes
``notebooks/06_compare_methods.ipynb`` through papermill; everything goes to ``outputs/<common.run>/``:
``<method>/<setting>/policy`` + ``train.json`` per trained setting and ``evals/<curve>/<setting>.json`` per finished
evaluation (a re-run on the same inputs reuses both), ``summary.json`` (with the resolved profile, git commit, versions,
device, and ``base_stages``: the sha256 of the data and reward-model stages it read), ``samples.jsonl``, ``plots/``.
One writer per comparison run: it holds the run's lock (:mod:`rlhf_lib.core.runlock`), so a second ``make compare``
on the same run is refused at once.

One evaluation path for every policy: the evaluation stage's own functions
(:func:`rlhf_lib.evaluate.sampling.sample_policy`, ``eval_sampling.score_samples``, ``eval_stats.win_rate``,
``evaluate.policy_block``) on the same held-out prompts with the same sampling seed, so the reference sample of each
prompt -- what win rates are judged against -- is the same for all methods.

A method setting that fails (a training or an evaluation raised) is reported at once on stderr with its folder, its
traceback kept in ``errors/<curve>/<setting>.txt``, and the comparison goes on without it; ``summary.json`` lists it
under ``failed`` and the command ends with the list and exit status 1. A re-run redoes only what did not finish.
Bad input is one ``error:`` line (exit 2), Ctrl-C / SIGTERM one ``interrupted`` line (exit 130 / 143).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import gc
import hashlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rlhf_lib.compare import average as policy_average
from rlhf_lib.compare import best_of_n as bon
from rlhf_lib.compare import frontier
from rlhf_lib.compare.best_of_n import BestOfNConfig
from rlhf_lib.compare.common import (
    TRAIN_FILE,
    MethodInputs,
    check_trained,
    is_trained,
    read_train_record,
    setting_inputs,
    setting_label,
)
from rlhf_lib.compare.dpo import DPOMethodConfig, train_dpo
from rlhf_lib.compare.online import GRPOMethodConfig, RLOOMethodConfig, train_online
from rlhf_lib.core import cli, runlock, runtime
from rlhf_lib.core.config import CommonConfig, ConfigError, validate
from rlhf_lib.core.io import repo_root, write_json_atomic
from rlhf_lib.core.runs import (
    Run,
    base_stage_hashes,
    first_line,
    git_state,
    outputs_root,
    package_versions,
    read_json,
)
from rlhf_lib.evaluate import sampling as eval_sampling
from rlhf_lib.evaluate import stage as evaluate
from rlhf_lib.evaluate import stats as eval_stats
from rlhf_lib.evaluate.reference_cache import cached_reference_samples
from rlhf_lib.evaluate.stage import EvalConfig
from rlhf_lib.ppo import checkpoints
from rlhf_lib.ppo import metrics as ppo_metrics

NOTEBOOK = "06_compare_methods.ipynb"
SECTIONS = {
    "common": None,
    "compare": None,
    "eval": EvalConfig,
    "best_of_n": BestOfNConfig,
    "dpo": DPOMethodConfig,
    "rloo": RLOOMethodConfig,
    "grpo": GRPOMethodConfig,
}
TRAINED = ("dpo", "rloo", "grpo")
PROFILE_SECTIONS = ("compare", "eval", "best_of_n", "dpo", "rloo", "grpo")  # Profile's configs, as summary.json records
EVALS = "evals"  # <run>/evals/<curve>/<setting>.json: one finished evaluation and the inputs it was made on
ERRORS = "errors"  # <run>/errors/<curve>/<setting>.txt: the traceback of a setting that failed (removed once it works)
REFUSALS = ("ConfigError", "RunBusyError", "OutputsError")  # raised in the notebook's kernel: bad input, exit 2


class CompareFailed(RuntimeError):
    """The comparison stopped on a fault outside any one method setting (the reference, the report notebook)."""


@dataclass
class CompareConfig(CommonConfig):
    """The comparison: which base run, which PPO curves, where to read the gold off at matched KL."""

    run: str = "compare"  # output folder name under outputs_dir
    model: str = ""  # "": the base run's model (the policy its data and reward model were built for)
    base_run: str = ""  # run whose data/ and reward_model/ every method uses: a name under outputs_dir, or a folder
    #   (a sweep point, e.g. default_beta/seed0-kl_coef0.1: its base run's data and reward model, its own PPO)
    ppo_base: bool = True  # put the base run's own PPO (checkpoints + final policy) on the frontier
    ppo_runs: list[str] = field(default_factory=list)  # more PPO runs on the same data + RM (names or folders), one
    #   curve each
    max_ppo_checkpoints: int = 4  # PPO checkpoints per PPO run (evenly spaced, the final policy always included)
    average_etas: list[float] = field(default_factory=list)  # policy averaging: W_ref + eta * mean of the PPO runs'
    #   final updates (base's PPO and ppo_runs on this base, >= 2), one policy per eta; []: off
    average_across_bases: bool = False  # average the PPO runs on other data / reward models too (a rewarded soup:
    #   each optimised its own reward model, Rame et al. 2023); False: only runs on this base
    kl_points: list[float] = field(default_factory=lambda: [1.0, 3.0, 6.0])  # KL (nats) at which gold is interpolated
    anchor_reference: bool = True  # every curve starts at the reference (KL 0, its gold) when interpolating
    n_sample_rows: int = 4  # prompts shown side by side per method in the notebook

    def check(self) -> None:
        if self.max_ppo_checkpoints < 0 or self.n_sample_rows < 0:
            raise ValueError("compare.max_ppo_checkpoints and compare.n_sample_rows must be >= 0")
        if any(not 0 < eta <= 1 for eta in self.average_etas):
            raise ValueError(f"compare.average_etas={self.average_etas}: each eta must lie in (0, 1]")
        if any(k <= 0 for k in self.kl_points):
            raise ValueError(f"compare.kl_points={self.kl_points} must all be > 0 (nats)")


@dataclass
class Profile:
    """A validated comparison profile: one config per section."""

    compare: CompareConfig
    eval: EvalConfig
    best_of_n: BestOfNConfig
    dpo: DPOMethodConfig
    rloo: RLOOMethodConfig
    grpo: GRPOMethodConfig
    source: str = ""


def load_profile(
    path: str | Path,
    base_run: str | None = None,
    run: str | None = None,
    outputs_dir: str | None = None,
    threads: int | None = None,
) -> Profile:
    """Read and validate params/compare/<profile>.yaml (unknown sections/keys and wrong types raise ConfigError)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"comparison profile {path} does not exist (profiles live in params/compare/*.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}; sections are {', '.join(SECTIONS)}")
    common = dict(raw.get("common") or {})
    values = {**common, **(raw.get("compare") or {})}
    for key, value in (("base_run", base_run), ("run", run), ("outputs_dir", outputs_dir), ("threads", threads)):
        if value:
            values[key] = value
    cfg = validate(CompareConfig, values, f"{path} [common/compare]")
    if not cfg.base_run:
        raise ConfigError(f"{path}: no base run: set compare.base_run or pass --base-run <run>")
    shared = {k: v for k, v in dataclasses.asdict(cfg).items() if k in CommonConfig.__dataclass_fields__}
    shared["model"] = cfg.model or base_model(resolve_base_run(cfg))
    ev = validate(EvalConfig, {**shared, **(raw.get("eval") or {})}, f"{path} [eval]")
    methods = {
        name: validate(SECTIONS[name], raw.get(name) or {}, f"{path} [{name}]")
        for name in ("best_of_n", "dpo", "rloo", "grpo")
    }
    cfg.model = shared["model"]
    return Profile(compare=cfg, eval=ev, source=str(path), **methods)


def resolve_run(entry: str, outputs: Path) -> Run:
    """A run given by name (under outputs) or by folder; it must have a manifest."""
    path = Path(entry).expanduser()
    root = path if (path / "manifest.json").exists() else outputs / entry
    if not (root / "manifest.json").exists():
        raise ConfigError(
            f"run {entry!r}: {root} is not a run folder (no manifest.json); give a run name under "
            f"{outputs} or a run folder"
        )
    return Run(root)


def resolve_base_run(cfg: CompareConfig) -> Run:
    """The base run, checked: its data and reward_model stages finished."""
    base = resolve_run(cfg.base_run, outputs_root(cfg))
    for stage in ("data", "reward_model"):
        source = base.upstream(stage)  # the run's own stage, or its base run's (a sweep point's, e.g.)
        if source.stage_status(stage) != "done":
            raise ConfigError(
                f"base run {source.root}: stage {stage!r} has not finished (status "
                f"{source.stage_status(stage)!r}); run it first (make pipeline RUN={source.name})"
            )
    return base


def base_model(base: Run) -> str:
    """The model reference the base run's data stage used."""
    source = base.upstream("data")
    params = source.manifest().get("stages", {}).get("data", {}).get("params", {})
    if not params.get("model"):
        raise ConfigError(f"{source.manifest_path}: the data stage records no model; set common.model in the profile")
    return params["model"]


# ----------------------------------------------------------------------------------------------------------------
# one evaluation path


@dataclass
class Context:
    """Everything shared by the evaluation of every policy: prompts, settings, reference, its samples, scorers."""

    settings: eval_sampling.GenerationSettings
    tokenizer: Any
    rows: list[dict[str, Any]]
    reference: Any
    ref_samples: eval_sampling.Samples
    ref_rm: np.ndarray
    ref_gold: np.ndarray | None
    rm_scorer: Any
    gold_scorer: Any
    judge: str
    eval_cfg: EvalConfig
    key: dict[str, Any] = field(default_factory=dict)  # what every evaluation depends on (see eval_key)

    @property
    def prompts(self) -> list[list[int]]:
        return [r["prompt_ids"] for r in self.rows]

    def judged(self, rm: np.ndarray, gold: np.ndarray | None) -> np.ndarray:
        return gold if self.judge == "gold" else rm


def make_context(ev: EvalConfig, base: Run, rm_scorer=None, gold_scorer=None) -> Context:
    """The evaluation stage's context (:func:`rlhf_lib.evaluate.stage.eval_context`: held-out prompts, sampling
    settings, reference, scorers) plus the reference's samples at the evaluation seed and their scores (the evaluation
    stage's reference cache: the same entry as the base run's own evaluation on the same prompts and settings)."""
    shared = evaluate.eval_context(ev, base, rm_scorer, gold_scorer)
    ref, rm, gold, _ = cached_reference_samples(shared, shared.prompts, desc="reference")
    key = eval_key(ev, base, shared.settings, shared.judge, shared.rm_scorer, shared.gold_scorer)
    return Context(
        shared.settings,
        shared.tokenizer,
        shared.rows,
        shared.reference,
        ref,
        rm,
        gold,
        shared.rm_scorer,
        shared.gold_scorer,
        shared.judge,
        ev,
        key,
    )


def folder_fingerprint(path: Path) -> str:
    """A short sha256 over the names, sizes and modification times of a folder's files (or of one file): it changes
    when anything in it is rewritten, e.g. a policy retrained into the same folder."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(root) if f != root else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _scorer_name(scorer: Any) -> str:
    return getattr(scorer, "__qualname__", type(scorer).__name__)


def eval_key(ev: EvalConfig, base: Run, settings, judge: str, rm_scorer: Any, gold_scorer: Any) -> dict[str, Any]:
    """The inputs every evaluation of a comparison depends on: the base run's data (its held-out prompts) and reward
    model, each by folder and fingerprint; the evaluation config (all but its thread count) and sampling settings; the
    scorers and the judge."""
    data_dir, rm_dir = base.upstream("data").data_dir, base.upstream("reward_model").reward_model_dir
    key = {
        "data": [str(data_dir.resolve()), folder_fingerprint(data_dir) if data_dir.exists() else None],
        "reward_model": [str(rm_dir.resolve()), folder_fingerprint(rm_dir) if rm_dir.exists() else None],
        "eval": {k: v for k, v in dataclasses.asdict(ev).items() if k != "threads"},
        "generation": settings.to_dict(),
        "scorers": [_scorer_name(rm_scorer), _scorer_name(gold_scorer) if gold_scorer is not None else None],
        "judge": judge,
    }
    return json.loads(json.dumps(key, default=str))  # as it reads back from JSON


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "=.-_" else "_" for c in text) or "all"


def cached_evaluation(
    ctx: Context, out: Run, curve: str, setting: str, policy_key: dict[str, Any], evaluate_now
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[str]]]:
    """``evaluate_now() -> (entries, texts)`` once per (curve, setting) and inputs: the result is kept in
    ``evals/<curve>/<setting>.json`` and read back by a re-run whose context key and `policy_key` are the same, so an
    interrupted comparison loses at most the evaluation it was in."""
    path = out.root / EVALS / _slug(curve) / f"{_slug(setting)}.json"
    key = json.loads(json.dumps({**ctx.key, "policy": policy_key}, default=str))
    try:
        saved = read_json(path)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); delete it to evaluate {curve} {setting} again") from None
    if saved is not None and saved.get("key") == key:
        print(f"[compare] {curve} {setting}: evaluated already ({path}), reusing it", flush=True)
        for e in saved["entries"]:
            _say(e)
        return saved["entries"], {(t["curve"], t["setting"]): t["texts"] for t in saved["texts"]}
    entries, texts = evaluate_now()
    record = {
        "key": key,
        "entries": entries,
        "texts": [{"curve": c, "setting": s, "texts": t} for (c, s), t in texts.items()],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return entries, texts


def _se(values: np.ndarray | None) -> float | None:
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0


def entry_from_samples(
    ctx: Context,
    samples: eval_sampling.Samples,
    rm: np.ndarray,
    gold: np.ndarray | None,
    method: str,
    setting: str,
    **extra: Any,
) -> dict[str, Any]:
    """A summary entry from one policy's samples: the evaluation stage's policy_block and win_rate."""
    block = evaluate.policy_block(samples, rm, gold)
    ev = ctx.eval_cfg
    win = eval_stats.win_rate(
        ctx.judged(rm, gold),
        ctx.judged(ctx.ref_rm, ctx.ref_gold),
        ev.tie_tolerance,
        ev.ci_method,
        n_bootstrap=ev.n_bootstrap,
        seed=ev.seed,
    )
    entry = {
        "method": method,
        "setting": setting,
        "kl": block["kl"],
        "kl_se": _se(samples.kl),
        "kl_analytic": None,
        "gold_score": block.get("gold_score"),
        "gold_score_se": _se(gold),
        "rm_score": block["rm_score"],
        "rm_score_se": _se(rm),
        "win_rate_vs_ref": win.rate,
        "win_rate_ci": [win.ci_low, win.ci_high],
        "length": block["length"],
        "eos_fraction": block["eos_fraction"],
        "train_seconds": 0.0,
        "generated_tokens": 0,
        "n_prompts": len(samples.texts),
        # per held-out prompt, in prompt order: what paired differences between methods are computed from
        "gold_per_prompt": None if gold is None else [round(float(g), 6) for g in gold],
    }
    entry.update(extra)
    return entry


def evaluate_policy(ctx: Context, policy, method: str, setting: str, **extra: Any) -> tuple[dict[str, Any], list[str]]:
    """Sample `policy` on the eval prompts (evaluation seed), score it, measure KL to the reference: one entry."""
    samples = eval_sampling.sample_policy(
        policy, ctx.tokenizer, ctx.prompts, ctx.settings, reference=ctx.reference, desc=f"{method} {setting}"
    )
    rm, gold = eval_sampling.score_samples(samples, ctx.rm_scorer, ctx.gold_scorer)
    entry = entry_from_samples(ctx, samples, rm, gold, method, setting, **extra)
    _say(entry)
    return entry, samples.texts


def _evaluate_saved(
    ctx: Context, load, folder: Path, method: str, setting: str, curve: str, **extra: Any
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[str]]]:
    """Load a saved policy folder, evaluate it (one entry) and free it: what cached_evaluation runs for one policy."""
    policy = load(folder)
    entry, texts = evaluate_policy(ctx, policy, method, setting, curve=curve, **extra)
    del policy
    gc.collect()
    return [entry], {(curve, setting): texts}


def _say(e: dict[str, Any]) -> None:
    gold = f"gold {e['gold_score']:+.3f} ± {e['gold_score_se']:.3f}" if e.get("gold_score") is not None else "no gold"
    print(
        f"[compare] {e['method']:>16} {e['setting']:>10}: KL {e['kl']:6.2f}  RM {e['rm_score']:+.3f}  {gold}  "
        f"win {e['win_rate_vs_ref']:.3f}",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------------
# one method setting that fails does not stop the others


def write_traceback(path: Path, err: BaseException) -> Path | None:
    """Keep ``err``'s traceback in ``path`` (for the one-line report to point at); None when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(type(err), err, err.__traceback__)), encoding="utf-8")
    except OSError:
        return None
    return path


def attempt(failures: list[dict[str, Any]] | None, out: Run, curve: str, setting: str, folder: Path, work: Callable):
    """``work()``, or None when it raised: the failure is printed at once (one ``error:`` line with the setting's
    folder), appended to ``failures`` and its traceback kept in ``errors/<curve>/<setting>.txt``.

    Bad input (ConfigError) stops the comparison, as does anything when ``failures`` is None; an interrupt stops it
    with ``compare_setting`` naming the setting it was in."""
    path = out.root / ERRORS / _slug(curve) / f"{_slug(setting)}.txt"
    try:
        result = work()
    except ConfigError:
        raise
    except Exception as err:
        if failures is None:
            raise
        kept = write_traceback(path, err)
        line = first_line(err) + (f" (traceback in {kept})" if kept else "")
        failures.append({"curve": curve, "setting": setting, "folder": str(folder), "error": line})
        print(f"error: {curve} {setting} ({folder}): {line}", file=sys.stderr, flush=True)
        return None
    except KeyboardInterrupt as err:
        if not hasattr(err, "compare_setting"):
            err.compare_setting = f"{curve} {setting}"
        raise
    path.unlink(missing_ok=True)  # a traceback of an earlier attempt no longer applies
    return result


def _collect(entries: list[dict[str, Any]], texts: dict, got) -> None:
    if got is not None:
        entries += got[0]
        texts.update(got[1])


# ----------------------------------------------------------------------------------------------------------------
# the methods


def ppo_points(run: Run, max_checkpoints: int) -> list[tuple[str, int | None, Path]]:
    """(setting, update, folder) of a PPO run: the evaluation stage's evenly spaced checkpoints
    (:func:`rlhf_lib.evaluate.stage.curve_checkpoints`), then the final policy when the run saved one."""
    chosen = evaluate.curve_checkpoints(run, max_checkpoints)[1:-1]  # without the reference and the final policy
    points = [(label, checkpoints.checkpoint_update(path), path) for label, _, path in chosen]
    if (run.policy_dir / "config.json").exists():
        points.append(("final", evaluate.final_update(run), run.policy_dir))
    return points


def ppo_cost(run: Run, update: int | None) -> tuple[float, int]:
    """(training seconds, generated tokens) of a PPO run up to `update` (None: all), from ppo/metrics.jsonl."""
    seconds, tokens, episodes = 0.0, 0.0, 0
    for row in ppo_metrics.read_jsonl(run.ppo_dir / "metrics.jsonl"):  # missing: no rows; a torn last line: skipped
        if update is not None and row.get("update", 0) > update:
            continue
        seconds += float(row.get("time/update", 0.0))
        tokens += float(row.get("objective/response_length", 0.0)) * (row.get("episode", 0) - episodes)
        episodes = row.get("episode", episodes)
    return seconds, int(round(tokens))


def ppo_entries(
    ctx: Context, cfg: CompareConfig, base: Run, out: Run, texts: dict, failures: list | None = None
) -> list[dict[str, Any]]:
    """Evaluate the PPO runs' checkpoints and final policies; a failed one is left out (see :func:`attempt`)."""
    entries: list[dict[str, Any]] = []
    for run in ppo_runs(cfg, base):
        curve = "ppo" if run.root == base.root else f"ppo:{run.name}"
        ppo_params = run.manifest().get("stages", {}).get("ppo", {}).get("params", {})
        kl_coef, reward = ppo_params.get("kl_coef"), run_reward(run)
        load = evaluate.default_policy_loader(ctx.eval_cfg, run, ctx.tokenizer, ctx.settings.device)
        other = other_base(run, base)
        for setting, update, folder in ppo_points(run, cfg.max_ppo_checkpoints):
            work = functools.partial(_ppo_setting, ctx, load, out, run, curve, kl_coef, reward, setting, update, folder)
            got = attempt(failures, out, curve, setting, folder, work)
            for entry in got[0] if got is not None and other else []:
                entry["other_base"] = True
            _collect(entries, texts, got)
    return entries


def ppo_runs(cfg: CompareConfig, base: Run) -> list[Run]:
    """The PPO runs on the frontier: the base run's own (when compare.ppo_base and it has a policy), then ppo_runs."""
    runs = [base] if cfg.ppo_base and (base.policy_dir / "config.json").exists() else []
    return runs + [resolve_run(name, outputs_root(cfg)) for name in cfg.ppo_runs]


def run_reward(run: Run) -> str:
    """The reward a PPO run optimised (its recorded ppo.ensemble_reward; "model" when absent)."""
    return run.manifest().get("stages", {}).get("ppo", {}).get("params", {}).get("ensemble_reward") or "model"


def averaged_runs(cfg: CompareConfig, base: Run) -> dict[str, list[Run]]:
    """The PPO runs whose final policies compare.average_etas averages, by the reward they optimised (runs that
    optimised different rewards are not averaged together): those on this base's data and reward model (a run on
    another base optimised another reward model), groups of >= 2. Raises ConfigError, before any work, when none."""
    if not cfg.average_etas:
        return {}
    groups: dict[str, list[Run]] = {}
    for run in ppo_runs(cfg, base):
        if cfg.average_across_bases or same_base(run, base):
            groups.setdefault(run_reward(run), []).append(run)
    if not any(len(runs) >= 2 for runs in groups.values()):
        found = ", ".join(f"{r.name} ({reward})" for reward, runs in groups.items() for r in runs) or "none"
        raise ConfigError(
            f"compare.average_etas averages the final policies of >= 2 PPO runs on base run {base.name} that "
            f"optimised one reward, but it has {found}: add PPO runs on this base to compare.ppo_runs (e.g. a "
            "sweep's seeds), set average_across_bases: true, or set average_etas: []"
        )
    return {reward: runs for reward, runs in groups.items() if len(runs) >= 2}


def _run_label(run: Run, outputs: Path) -> str:
    """A run as compare.ppo_runs names it: its path under the outputs folder (e.g. a sweep's seed1), else absolute."""
    root = run.root.resolve()
    return str(root.relative_to(outputs.resolve())) if root.is_relative_to(outputs.resolve()) else str(root)


def average_entries(
    ctx: Context, cfg: CompareConfig, base: Run, model_ref: str, out: Run, texts: dict, failures: list | None = None
) -> list[dict[str, Any]]:
    """One policy per eta of compare.average_etas and per reward the runs optimised: the PPO runs' mean final
    update, interpolated towards the reference (:mod:`rlhf_lib.compare.average`), written to
    ``ppo_average/eta=<eta>/policy`` (``ppo_average/<reward>/eta=<eta>/policy`` and curve ``ppo_average:<reward>``
    for a reward other than the saved model) and evaluated."""
    entries: list[dict[str, Any]] = []
    for reward, runs in averaged_runs(cfg, base).items():
        entries += _average_group(ctx, cfg, base, model_ref, out, texts, failures, reward, runs)
    return entries


def _average_group(
    ctx: Context,
    cfg: CompareConfig,
    base: Run,
    model_ref: str,
    out: Run,
    texts: dict,
    failures: list | None,
    reward: str,
    runs: list[Run],
) -> list[dict[str, Any]]:
    curve = policy_average.METHOD if reward == "model" else f"{policy_average.METHOD}:{reward}"
    members = [r.policy_dir for r in runs]
    costs = [ppo_cost(r, None) for r in runs]
    params = runs[0].manifest().get("stages", {}).get("ppo", {}).get("params", {})
    extra = dict(
        members=[_run_label(r, outputs_root(cfg)) for r in runs],
        across_bases=cfg.average_across_bases,
        beta=params.get("kl_coef"),
        reward=reward,
        train_seconds=sum(c[0] for c in costs),  # what the average cost: every seed's PPO run
        generated_tokens=sum(c[1] for c in costs),
    )
    load = evaluate.default_policy_loader(ctx.eval_cfg, base, ctx.tokenizer, ctx.settings.device)
    key = {"members": [str(m.resolve()) for m in members], "fingerprints": [folder_fingerprint(m) for m in members]}
    root = out.root / policy_average.METHOD / ("" if reward == "model" else reward)
    entries: list[dict[str, Any]] = []
    for eta in cfg.average_etas:
        setting = setting_label("eta", eta)
        folder = root / setting

        def now(eta=eta, setting=setting, folder=folder):
            policy_average.average_policy(model_ref, members, eta, ctx.tokenizer, folder / "policy")
            return _evaluate_saved(
                ctx, load, folder / "policy", policy_average.METHOD, setting, curve, eta=eta, **extra
            )

        work = functools.partial(cached_evaluation, ctx, out, curve, setting, {**key, "eta": eta}, now)
        _collect(entries, texts, attempt(failures, out, curve, setting, folder, work))
    return entries


def same_base(run: Run, base: Run) -> bool:
    """Whether a run read the comparison base's data and reward model: it is the base, or their stages' hashes are
    equal and known."""
    if run.root == base.root:
        return True
    ours = base_stage_hashes(base)
    return ours is not None and base_stage_hashes(run) == ours


def other_base(run: Run, base: Run) -> bool:
    """Whether a PPO run read other data or another reward model than the comparison's base (by content); its
    points are then marked ``other_base``: its policy optimised another reward, and beside this base's methods it
    compares two setups, not two methods."""
    if same_base(run, base):
        return False
    print(
        f"[compare] {run.name}: its data / reward-model stages differ from base run {base.name}'s (or are unknown); "
        "its points are marked other_base"
    )
    return True


def _ppo_setting(
    ctx: Context, load, out: Run, run: Run, curve: str, kl_coef, reward, setting: str, update, folder: Path
):
    seconds, tokens = ppo_cost(run, None if setting == "final" else update)
    extra = dict(run=run.name, step=update, beta=kl_coef, reward=reward, train_seconds=seconds, generated_tokens=tokens)
    policy_key = {"folder": str(folder.resolve()), "fingerprint": folder_fingerprint(folder)}
    return cached_evaluation(
        ctx, out, curve, setting, policy_key, lambda: _evaluate_saved(ctx, load, folder, "ppo", setting, curve, **extra)
    )


def check_reusable(profile: Profile, inputs: MethodInputs, out: Run, base: Run) -> None:
    """Before any work: every trained setting a re-run would reuse was trained on this comparison's inputs, and
    after the base run's data and reward model were last made (a stage redone in place keeps its folder name)."""
    for method in TRAINED:
        cfg = getattr(profile, method)
        for beta in cfg.betas if cfg.enabled else []:
            folder = out.root / method / setting_label("beta", beta)
            if is_trained(folder):
                check_trained(folder, setting_inputs(inputs, cfg))
                _check_newer_than_base(folder, base)


def _check_newer_than_base(folder: Path, base: Run) -> None:
    import datetime as dt

    trained = dt.datetime.fromtimestamp((folder / TRAIN_FILE).stat().st_mtime, dt.timezone.utc)
    for stage in ("data", "reward_model"):
        source = base.upstream(stage)
        ended = source.stage_entry(stage).get("ended")
        if ended and dt.datetime.fromisoformat(ended) > trained:
            raise ConfigError(
                f"{folder / TRAIN_FILE}: trained before {source.root}'s {stage} stage was redone ({ended}); delete "
                f"{folder} to retrain it on the new {stage}, or write this comparison to another run (--run NAME)"
            )


def trained_entries(
    ctx: Context,
    profile: Profile,
    inputs: MethodInputs,
    out: Run,
    texts: dict,
    scorer=None,
    failures: list | None = None,
) -> list[dict[str, Any]]:
    """Train (unless already trained) and evaluate every beta of DPO, RLOO and GRPO; a setting that fails is left
    out and the others go on (see :func:`attempt`)."""
    entries: list[dict[str, Any]] = []
    for method in TRAINED:
        cfg = getattr(profile, method)
        if not cfg.enabled:
            continue
        for beta in cfg.betas:
            setting = setting_label("beta", beta)
            folder = out.root / method / setting
            work = functools.partial(_trained_setting, ctx, method, cfg, inputs, out, beta, folder, scorer)
            _collect(entries, texts, attempt(failures, out, method, setting, folder, work))
    return entries


def _trained_setting(ctx: Context, method: str, cfg, inputs: MethodInputs, out: Run, beta: float, folder: Path, scorer):
    """Train one beta of a method into ``folder`` (unless trained already) and evaluate its policy."""
    setting = folder.name
    if is_trained(folder):  # its inputs were checked by check_reusable before any evaluation
        print(f"[compare] {method} {setting}: trained already ({folder})", flush=True)
    elif method == "dpo":
        train_dpo(cfg, inputs, beta, folder)
    else:
        train_online(
            method,
            cfg,
            inputs,
            beta,
            folder,
            cfg.response_length or ctx.settings.response_length,
            cfg.temperature or ctx.settings.temperature,
            scorer=scorer,
        )
    record = read_train_record(folder)
    extra = dict(beta=beta, train_seconds=record.get("train_seconds"), generated_tokens=record.get("generated_tokens"))
    extra["reward"] = None if method == "dpo" else cfg.reward  # what it optimised (DPO: the pairs, no reward model)
    load = evaluate.default_policy_loader(ctx.eval_cfg, out, ctx.tokenizer, ctx.settings.device)
    policy_key = {
        "folder": str(folder.resolve()),
        "fingerprint": folder_fingerprint(folder / "policy"),
        "train": folder_fingerprint(folder / TRAIN_FILE),
    }
    return cached_evaluation(
        ctx,
        out,
        method,
        setting,
        policy_key,
        lambda: _evaluate_saved(ctx, load, folder / "policy", method, setting, method, **extra),
    )


def best_of_n_entries(
    ctx: Context, cfg: BestOfNConfig, out: Run, texts: dict, failures: list | None = None, rm_dir: Path | None = None
) -> list[dict[str, Any]]:
    """Best-of-N from one pool of reference samples, ranked by each of ``cfg.rewards`` (the ensemble's
    combinations are read from the reward model folder ``rm_dir``); left out when it fails (see :func:`attempt`)."""
    if not cfg.enabled:
        return []
    entries: list[dict[str, Any]] = []
    work = functools.partial(
        cached_evaluation,
        ctx,
        out,
        bon.METHOD,
        "pool",
        dataclasses.asdict(cfg),
        lambda: _best_of_n_now(ctx, cfg, rm_dir),
    )
    _collect(entries, texts, attempt(failures, out, bon.METHOD, "pool", out.root / EVALS / bon.METHOD, work))
    return entries


def _best_of_n_now(ctx: Context, cfg: BestOfNConfig, rm_dir: Path | None) -> tuple[list[dict[str, Any]], dict]:
    texts: dict[tuple[str, str], list[str]] = {}
    others = [r for r in cfg.rewards if r != "model"]
    if others and rm_dir is None:
        raise ValueError(f"best_of_n.rewards {others} need the base run's reward model folder")
    scorers = {
        r: eval_sampling.reward_model_scorer(rm_dir, ctx.settings, ctx.tokenizer, reward=r) for r in others
    }  # each loads the ensemble's members; the pool is scored by all of them as it is drawn
    pool = bon.sample_pool(
        ctx.reference,
        ctx.tokenizer,
        ctx.prompts,
        ctx.settings,
        cfg.n_samples,
        ctx.rm_scorer,
        ctx.gold_scorer,
        scorers,
    )
    ev = ctx.eval_cfg
    entries = bon.best_of_n_entries(
        cfg,
        pool,
        ctx.judged(ctx.ref_rm, ctx.ref_gold),
        ctx.judge,
        tie_tolerance=ev.tie_tolerance,
        ci_method=ev.ci_method,
        n_bootstrap=ev.n_bootstrap,
        seed=ev.seed,
    )
    for e in entries:
        e["sample_seconds"] = pool.sample_seconds * e["n"] / cfg.n_samples
        _say(e)
        if e["method"] == bon.METHOD:
            texts[(e["curve"], e["setting"])] = bon.chosen_texts(pool, e["n"], len(ctx.rows), e["reward"])
    return entries, texts


# ----------------------------------------------------------------------------------------------------------------
# gold at matched KL


def interpolate_at(points: Sequence[tuple[float, float]], at: float) -> float | None:
    """Gold linearly interpolated at KL `at` through (kl, gold) points sorted by KL; None outside their range."""
    pts = sorted(
        (float(k), float(g))
        for k, g in points
        if k is not None and g is not None and math.isfinite(k) and math.isfinite(g)
    )
    if not pts or at < pts[0][0] or at > pts[-1][0]:
        return None
    return float(np.interp(at, [k for k, _ in pts], [g for _, g in pts]))


def gold_at_kl(
    entries: Sequence[dict[str, Any]], kl_points: Sequence[float], anchor: dict | None = None, kl_key: str = "kl"
) -> dict[str, dict[str, float | None]]:
    """Per curve (method, or ppo:<run>), gold interpolated at each KL point; `anchor` (the reference) is added to
    every curve as (KL 0, its gold) when given."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        if e.get("method") == "reference":
            continue
        kl = e.get("kl_analytic") if kl_key == "kl_analytic" and e.get("kl_analytic") is not None else e.get("kl")
        curves.setdefault(e.get("curve") or e["method"], []).append((kl, e.get("gold_score")))
    if anchor is not None and anchor.get("gold_score") is not None:
        for pts in curves.values():
            pts.append((0.0, anchor["gold_score"]))
    return {name: {f"{k:g}": interpolate_at(pts, k) for k in kl_points} for name, pts in curves.items()}


# ----------------------------------------------------------------------------------------------------------------
# the whole comparison


def run_comparison(profile: Profile, rm_scorer=None, gold_scorer=None, train_scorer=None) -> dict[str, Any]:
    """Evaluate the reference, PPO, best-of-N, and train + evaluate DPO / RLOO / GRPO; write summary.json.

    Scorers replace the base run's reward model / gold (tests); `train_scorer` replaces the RM as RLOO/GRPO's reward.
    """
    start = time.perf_counter()
    cfg = profile.compare
    runtime.set_threads(cfg.threads)  # common.threads, as every pipeline stage does
    base = resolve_base_run(cfg)
    out = Run(outputs_root(cfg) / cfg.run)
    if out.root.resolve() == base.root.resolve():
        raise ConfigError(f"compare run {cfg.run!r} is the base run itself; choose another common.run")
    inputs = MethodInputs(
        cfg.model,
        base.upstream("data").data_dir,
        base.upstream("reward_model").reward_model_dir,
        cfg.seed,
        cfg.device,
        cfg.dtype,
    )
    check_reusable(profile, inputs, out, base)
    averaged_runs(cfg, base)  # enough PPO runs on this base to average, before any work
    lock = runlock.acquire(out.root, "compare", what=f"compare {profile.source}")  # one writer per run
    try:
        return _compare(profile, base, out, inputs, start, rm_scorer, gold_scorer, train_scorer)
    finally:
        lock.release("compare")


def _compare(
    profile: Profile, base: Run, out: Run, inputs: MethodInputs, start: float, rm_scorer, gold_scorer, train_scorer
) -> dict[str, Any]:
    cfg = profile.compare
    ctx = make_context(profile.eval, base, rm_scorer, gold_scorer)
    texts: dict[tuple[str, str], list[str]] = {("reference", ""): ctx.ref_samples.texts}
    reference = entry_from_samples(ctx, ctx.ref_samples, ctx.ref_rm, ctx.ref_gold, "reference", "", curve="reference")
    entries, failures = [reference], []
    entries += ppo_entries(ctx, cfg, base, out, texts, failures)
    entries += average_entries(ctx, cfg, base, inputs.model, out, texts, failures)
    rm_dir = base.upstream("reward_model").reward_model_dir
    entries += best_of_n_entries(ctx, profile.best_of_n, out, texts, failures, rm_dir)
    entries += trained_entries(ctx, profile, inputs, out, texts, train_scorer, failures)
    anchor = reference if cfg.anchor_reference else None
    summary = {
        "base_run": str(base.root),
        # the data and reward model the comparison read, by content, as a sweep point records them (None: unknown)
        "base_stages": base_stage_hashes(base),
        "profile": profile.source,
        "params": {name: dataclasses.asdict(getattr(profile, name)) for name in PROFILE_SECTIONS},
        "git": git_state(),
        "versions": package_versions(),
        "device": runtime.describe_device(runtime.pick_device(cfg.device), cfg.dtype),
        "judge": ctx.judge,
        "generation": ctx.settings.to_dict(),
        "n_eval_prompts": len(ctx.rows),
        "methods": entries,
        # curves trained on other data / another reward model than base_stages (their points: other_base)
        "mixed_bases": sorted({e["curve"] for e in entries if e.get("other_base")}),
        "gold_at_kl": gold_at_kl(entries, cfg.kl_points, anchor),
        # Gao et al. (2022)'s best-of-N form per best-of-N curve: where reward-ranked gold would peak
        "best_of_n_fit": bon.best_of_n_fits(entries, reference.get("gold_score")),
        "failed": failures,  # method settings left out: curve, setting, folder, error line
        "wall_seconds": time.perf_counter() - start,
    }
    write_json_atomic(out.root / "summary.json", summary)
    write_json_atomic(out.root / "frontier.json", frontier.frontier_summary(summary, frontier_rewards(cfg, base)))
    _write_samples(out, ctx, texts, entries, cfg.n_sample_rows)
    print(f"[compare] wrote {out.root / 'summary.json'} ({summary['wall_seconds']:.0f} s)")
    return summary


def frontier_rewards(cfg: CompareConfig, base: Run) -> list[dict[str, Any]]:
    """The rewards on the frontier: the reward model of the base run and of each PPO run, once each."""
    rows, seen = [], set()
    for run in [base, *ppo_runs(cfg, base)]:
        source = run.upstream("reward_model")
        if source.root.resolve() in seen:
            continue
        seen.add(source.root.resolve())
        rows += frontier.reward_rows(_run_label(source, outputs_root(cfg)), source.summary(), source.reward_model_dir)
    return rows


def _write_samples(out: Run, ctx: Context, texts: dict, entries: list[dict[str, Any]], n_rows: int) -> None:
    from rlhf_lib.core.io import write_jsonl

    rows = []
    for (curve, setting), responses in texts.items():
        for i, text in enumerate(responses[:n_rows]):
            rows.append(
                {
                    "curve": curve,
                    "setting": setting,
                    "prompt_index": i,
                    "prompt": evaluate.prompt_display_text(ctx.rows[i]),
                    "response": text,
                }
            )
    write_jsonl(out.root / "samples.jsonl", rows)


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    summary = read_json(path)
    if summary is None:
        raise FileNotFoundError(f"{path} does not exist: run the comparison first (make compare)")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# entry point


def execute(
    params: str,
    base_run: str | None,
    run: str | None,
    outputs_dir: str | None,
    notebook: bool = True,
    kernel_name: str = "python3",
    threads: int | None = None,
) -> Path:
    """Validate the profile, then run the notebook (which runs the comparison) or the comparison in-process.

    Raises ConfigError / RunBusyError / cli.OutputsError on bad input, CompareFailed when the comparison stopped
    on another fault (one line: the error, and where its traceback is), KeyboardInterrupt with ``compare_run`` set
    to the run folder when interrupted. A method setting that failed does not raise: summary.json lists it."""
    profile = load_profile(params, base_run, run, outputs_dir, threads)
    out_root = outputs_root(profile.compare) / profile.compare.run
    try:
        if not notebook:
            _run_in_process(profile, out_root)
            return out_root

        from rlhf_lib import TEXT_PROGRESS_ENV

        os.environ[TEXT_PROGRESS_ENV] = "1"
        lock = runlock.acquire(out_root, "compare", what=f"compare {profile.source}")  # before the kernel starts
        try:
            with runlock.environ(runlock.LOCK_ENV, lock.info.get("token", "")):  # the kernel works under this lock
                _execute_notebook(params, profile, out_root, kernel_name)
        finally:
            lock.release("compare")
    except KeyboardInterrupt as err:
        err.compare_run = out_root
        raise
    return out_root


def _run_in_process(profile: Profile, out_root: Path) -> None:
    try:
        run_comparison(profile)
    except (ConfigError, runlock.RunBusyError, OSError) as err:
        if isinstance(err, OSError) and not _is_write_error(err):
            raise _failed(err, out_root) from err
        raise
    except Exception as err:
        raise _failed(err, out_root) from err


def _is_write_error(err: OSError) -> bool:
    """An outputs folder that cannot be written (read-only, no permission, full): bad input, not a fault."""
    return isinstance(err, cli.OutputsError) or err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM)


def _failed(err: BaseException, out_root: Path) -> CompareFailed:
    kept = write_traceback(out_root / ERRORS / "comparison.txt", err)
    return CompareFailed(f"comparison failed: {first_line(err)}" + (f" (traceback in {kept})" if kept else ""))


def _execute_notebook(params: str, profile: Profile, out_root: Path, kernel_name: str) -> None:
    """papermill on the comparison notebook; a failed cell is one exception: ConfigError for bad input,
    KeyboardInterrupt for an interrupted kernel, else CompareFailed naming the executed notebook."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    (out_root / "notebooks").mkdir(parents=True, exist_ok=True)
    executed = out_root / "notebooks" / NOTEBOOK
    try:
        with cli.forward_interrupts():  # Ctrl-C / SIGTERM interrupt the kernel's cell, then stop here
            _papermill(papermill, params, profile, executed, kernel_name)
    except PapermillExecutionError as err:
        message = first_line(str(err.evalue)) or err.ename
        if err.ename in REFUSALS:
            raise ConfigError(message) from None
        if err.ename == "KeyboardInterrupt":
            raise KeyboardInterrupt() from None
        raise CompareFailed(
            f"comparison failed: {err.ename}: {message} (executed notebook with the traceback: {executed})"
        ) from None


def _papermill(papermill, params: str, profile: Profile, executed: Path, kernel_name: str) -> None:
    """papermill on the comparison notebook, its output live on this console, its kernel's pid kept for interrupts."""
    root = repo_root()
    papermill.execute_notebook(
        str(root / "notebooks" / NOTEBOOK),
        str(executed),
        parameters={
            "params": str(Path(params).resolve()),
            "base_run": profile.compare.base_run,
            "run": profile.compare.run,
            "outputs_dir": str(outputs_root(profile.compare)),
            "threads": profile.compare.threads,
        },
        kernel_name=kernel_name,
        cwd=str(root / "notebooks"),
        stdout_file=sys.stdout,
        stderr_file=sys.stderr,
        progress_bar=False,
        **cli.kernel_options(),
    )


def report_failures(out: Path) -> int:
    """After a comparison ran: list the method settings its summary.json says failed (exit 1), else 0."""
    failed = (read_json(out / "summary.json", {}) or {}).get("failed") or []
    if not failed:
        return 0
    cli.error(
        f"comparison {out.name!r} ({out}): {len(failed)} method setting{'s' if len(failed) > 1 else ''} failed; fix "
        "the cause and re-run the same command (finished trainings and evaluations are reused)"
    )
    for f in failed:
        print(f"  failed: {f['curve']} {f['setting']} ({f['folder']}): {f['error']}", file=sys.stderr)
    sys.stderr.flush()
    return cli.EXIT_FAILED


def interrupted_line(err: BaseException) -> str:
    """'interrupted during comparison 'cmp' (<folder>) in dpo beta=0.1; re-run ...' for an interrupt of execute."""
    root = getattr(err, "compare_run", None)
    setting = getattr(err, "compare_setting", None)
    return (
        "interrupted during comparison"
        + (f" {Path(root).name!r} ({root})" if root else "")
        + (f" in {setting}" if setting else "")
        + "; re-run the same command to finish (finished trainings and evaluations are reused)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 done, 1 a method setting or the comparison failed, 2 bad input or a busy run,
    130 / 143 interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/compare/default.yaml", help="comparison profile (YAML)")
    parser.add_argument("--base-run", default=None, help="run whose data and reward model are used (name or folder)")
    parser.add_argument("--run", default=None, help="output run name (default: the profile's common.run)")
    parser.add_argument("--outputs-dir", default=None, help="outputs folder (default: the profile's, else outputs/)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the profile's common.threads)"
    )
    parser.add_argument("--no-notebook", action="store_true", help="run in-process, without the notebook")
    args = parser.parse_args(argv)
    try:
        with cli.interrupts_raise():
            out = execute(
                args.params,
                args.base_run,
                args.run,
                args.outputs_dir,
                notebook=not args.no_notebook,
                threads=args.threads,
            )
    except KeyboardInterrupt as err:
        print(interrupted_line(err), file=sys.stderr, flush=True)
        return cli.interrupt_status(err)
    except (ConfigError, runlock.RunBusyError, cli.OutputsError) as err:
        return cli.error(str(err))
    except OSError as err:  # the run's lock or a folder could not be written
        if err.errno == errno.ENOSPC:
            return cli.error(cli.os_error_line(err))
        return cli.error(
            f"cannot write {err.filename or 'the comparison run'}: {err.strerror or err}; choose a writable outputs "
            "folder (--outputs-dir DIR)"
        )
    except CompareFailed as err:
        cli.error(str(err))
        return cli.EXIT_FAILED
    print(f"[compare] outputs in {out}")
    return report_failures(out)
