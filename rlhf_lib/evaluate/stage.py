"""Stage 4, evaluation: did RLHF work, at what cost in KL, and was the reward model over-optimised?

Public steps (notebook 04_evaluate calls them in this order):
    evaluate_policies(cfg, run)      -> EvalResult  reference vs trained policy on held-out prompts (paired samples)
    sample_table(result)             -> DataFrame   side-by-side responses and their scores
    overoptimisation_curve(cfg, run) -> DataFrame   RM and gold score vs KL for PPO checkpoints (Gao et al. 2022)
    compare_runs(run_dirs)           -> DataFrame   headline numbers of several runs, one row each
    stage_summary(result, curve)     -> dict        what goes into summary.json["eval"]
Sampling and scoring are in rlhf_lib.evaluate.sampling, the statistics (KL estimate, win rate and its interval) in
rlhf_lib.evaluate.stats, figures in rlhf_lib.evaluate.plots. The reference's samples and scores are computed once per
exact inputs (reference model, prompts, sampling settings, reward model, gold scorer) and read back by every later
evaluation on them, e.g. the other runs of a sweep on one base run: rlhf_lib.evaluate.reference_cache; results.json
says whether this evaluation's came from there (``reference_cached``).

Metric definitions (also the README glossary):
- kl: KL(policy || reference) per sequence, estimated on responses sampled from the policy as the sum over the
  response's valid tokens (EOS included) of log p_policy - log p_ref, both at the sampling temperature (the k1
  estimator of Schulman 2020, summed as in Ziegler et al. 2019). Unbiased; a single sequence can be negative.
- win rate: share of prompts where the trained policy's response scores higher than the reference's response to the
  same prompt (paired by seed), ties counted as half; ties are also reported on their own.
- win_rate_ci: 95% Wilson score interval of that rate (ties as half a success, which can only widen the interval
  since a half-credit outcome has less variance than a Bernoulli one), or a paired percentile bootstrap.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from rlhf_lib.core import io, runtime
from rlhf_lib.core.config import CommonConfig, ConfigError, validate
from rlhf_lib.core.io import JSONLError, iter_jsonl, read_jsonl, write_json_atomic
from rlhf_lib.core.runs import Run, read_json
from rlhf_lib.evaluate.reference_cache import ReferenceCache, cached_reference_samples, reference_cache_for
from rlhf_lib.evaluate.sampling import (
    GenerationSettings,
    GoldScorer,
    RMScorer,
    Samples,
    reward_model_scorer,
    sample_policy,
    score_samples,
)
from rlhf_lib.evaluate.stats import WinRate, mean_std, pair_outcomes, win_rate
from rlhf_lib.lm import models
from rlhf_lib.ppo.checkpoints import checkpoint_update, list_checkpoints, load_policy_checkpoint
from rlhf_lib.reward.combined import check_reward

PolicyLoader = Callable[[Path], torch.nn.Module]  # checkpoint folder -> causal LM (on the eval device)

# Used only when neither this stage nor the PPO stage's recorded params give a value.
FALLBACK_RESPONSE_LENGTH = 64
FALLBACK_TEMPERATURE = 0.7  # TRL's PPO default


@dataclass
class EvalConfig(CommonConfig):
    """Evaluation of the trained policy against the reference on held-out prompts."""

    n_eval_prompts: int = 0  # held-out prompts to evaluate (first N of data/eval_prompts.jsonl); 0: all
    response_length: int | None = None  # new tokens per response; None: the PPO stage's response_length
    temperature: float | None = None  # sampling temperature of both policies (KL is measured at it); None: PPO's
    batch_size: int = 32  # prompts per generation / log-prob / scoring batch
    win_rate_judge: str = "auto"  # who decides a win: auto (gold when the data has a gold scorer, else rm), gold, rm
    tie_tolerance: float = 0.0  # a pair whose judge scores differ by at most this counts as a tie
    ci_method: str = "wilson"  # 95% CI of the win rate: wilson (ties count half) or bootstrap (paired resampling)
    n_bootstrap: int = 2000  # resamples when ci_method is bootstrap
    max_checkpoints: int = 4  # PPO checkpoints on the over-optimisation curve (evenly spaced, last included); 0: none
    overopt_prompts: int = 64  # eval prompts per point of the over-optimisation curve (first N); 0: all evaluated
    n_table_rows: int = 8  # rows of the side-by-side sample table in the notebook (samples.csv/.jsonl hold all)
    compare_runs: list[str] = field(default_factory=list)  # other runs to compare: names under outputs_dir, or folders
    ensemble_reward: str | None = None  # the reward-model score reported: "model" (the saved model), or an
    #   ensemble's members combined (mean, min, uwo); None: what the PPO stage optimised

    def check(self) -> None:
        """Cross-field checks (ValueError names the field and the fix)."""
        if self.n_eval_prompts < 0:
            raise ValueError(f"n_eval_prompts={self.n_eval_prompts} must be >= 0 (0 = all eval prompts)")
        if self.response_length is not None and self.response_length <= 0:
            raise ValueError(f"response_length={self.response_length} must be > 0, or None for the PPO stage's value")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(
                f"temperature={self.temperature} must be > 0 (KL needs a sampling distribution), or None for PPO's"
            )
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} must be > 0")
        if self.win_rate_judge not in ("auto", "gold", "rm"):
            raise ValueError(f"win_rate_judge={self.win_rate_judge!r} must be auto, gold or rm")
        if self.tie_tolerance < 0:
            raise ValueError(f"tie_tolerance={self.tie_tolerance} must be >= 0")
        if self.ci_method not in ("wilson", "bootstrap"):
            raise ValueError(f"ci_method={self.ci_method!r} must be wilson or bootstrap")
        if self.n_bootstrap <= 0:
            raise ValueError(f"n_bootstrap={self.n_bootstrap} must be > 0")
        for name in ("max_checkpoints", "overopt_prompts", "n_table_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.ensemble_reward is not None:
            check_reward(self.ensemble_reward, "evaluation.ensemble_reward")


# ----------------------------------------------------------------------------------------------------------------
# inputs: sampling settings, prompts, models, scorers


def scoring_reward(cfg: EvalConfig, run: Run) -> str:
    """The reward the evaluation scores with: ``ensemble_reward``, else what the PPO stage recorded, else "model"."""
    if cfg.ensemble_reward is not None:
        return cfg.ensemble_reward
    ppo_params = run.manifest().get("stages", {}).get("ppo", {}).get("params", {})
    return ppo_params.get("ensemble_reward") or "model"


def generation_settings(cfg: EvalConfig, run: Run) -> GenerationSettings:
    """This stage's sampling settings; response_length/temperature default to what the PPO stage trained with."""
    ppo_params = run.manifest().get("stages", {}).get("ppo", {}).get("params", {})

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(cfg, name)
        if value is None:
            value = ppo_params.get(name)
        if value is None:
            print(f"[eval] {name}: not set and not recorded by the PPO stage; using {fallback}")
            value = fallback
        return value

    device = runtime.pick_device(cfg.device)
    return GenerationSettings(
        response_length=int(pick("response_length", FALLBACK_RESPONSE_LENGTH)),
        temperature=float(pick("temperature", FALLBACK_TEMPERATURE)),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
        dtype=runtime.pick_dtype(cfg.dtype, device),
    )


def load_eval_prompts(run: Run, limit: int = 0) -> list[dict[str, Any]]:
    """Rows of data/eval_prompts.jsonl (the first `limit`; 0 = all), each checked for integer `prompt_ids`."""
    path = run.upstream("data").data_dir / "eval_prompts.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the data stage (notebooks/01_data_prep.ipynb) first")
    rows: list[dict[str, Any]] = []
    try:
        for lineno, row in iter_jsonl(path):
            ids = row.get("prompt_ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                raise ValueError(
                    f"{path} line {lineno}: field 'prompt_ids' must be a non-empty list of token ids; "
                    "re-run the data stage"
                )
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    except JSONLError as err:
        raise ValueError(f"{err}; re-run the data stage") from None
    if not rows:
        raise ValueError(f"{path} holds no prompts; re-run the data stage with some eval prompts")
    if limit and len(rows) < limit:
        print(f"[eval] n_eval_prompts={limit} but {path.name} has {len(rows)}: using all {len(rows)}")
    return rows


def prompt_display_text(row: dict[str, Any]) -> str:
    """The last user message of a prompt row (what a person wants to read), else its templated text."""
    for message in reversed(row.get("prompt") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content", ""))
    return str(row.get("prompt_text", ""))


def gold_scorer_name(run: Run) -> str | None:
    """The data stage's gold scorer ("vader" or None), from data/report.json."""
    report = read_json(run.upstream("data").data_dir / "report.json", {})  # the base run's with common.base_run
    return (report or {}).get("gold_scorer")


def default_gold_scorer(run: Run) -> GoldScorer | None:
    """annotator.gold_scores when data/report.json names a gold scorer, else None (no gold for real data)."""
    if gold_scorer_name(run) is None:
        return None
    from rlhf_lib.data.annotator import gold_scores

    return gold_scores


def _ppo_config_for(run: Run, cfg: CommonConfig) -> Any:
    """The config the PPO stage ran with (from the manifest), for checkpoints.load_policy_checkpoint; else `cfg`."""
    params = run.manifest().get("stages", {}).get("ppo", {}).get("params")
    if not params:
        return cfg
    try:
        from rlhf_lib.ppo.trainer import PPOConfig

        names = {f.name for f in dataclasses.fields(PPOConfig)}
        return validate(PPOConfig, {k: v for k, v in params.items() if k in names}, "manifest [ppo] params")
    except (ImportError, ConfigError, TypeError):
        return cfg


def default_policy_loader(cfg: CommonConfig, run: Run, tokenizer, device: torch.device) -> PolicyLoader:
    """Load a policy folder: a full HF causal-LM folder directly, anything else through
    checkpoints.load_policy_checkpoint."""

    def load(path: Path) -> torch.nn.Module:
        path = Path(path)
        if (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            return models.load_causal_lm(str(path), tokenizer, device).eval()
        model = load_policy_checkpoint(path, _ppo_config_for(run, cfg))
        model = model[0] if isinstance(model, tuple) else model
        return models.disable_dropout(model).to(device).eval()

    return load


def _check_policy_dir(run: Run) -> None:
    if not (run.policy_dir / "config.json").exists() and not (run.policy_dir / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{run.policy_dir} holds no trained policy (no config.json): run the ppo stage "
            "(notebooks/03_ppo.ipynb) first"
        )


# ----------------------------------------------------------------------------------------------------------------
# evaluation of two policies


def policy_block(samples: Samples, rm: np.ndarray, gold: np.ndarray | None) -> dict[str, float]:
    """Headline numbers of one policy's samples (keys of summary.json's before/after)."""
    block: dict[str, float] = {}
    block["rm_score"], block["rm_score_std"] = mean_std(rm)
    if gold is not None:
        block["gold_score"], block["gold_score_std"] = mean_std(gold)
    block["kl"] = float(np.mean(samples.kl)) if samples.kl.size else math.nan
    block["length"] = float(np.mean(samples.lengths)) if samples.kl.size else math.nan
    block["eos_fraction"] = float(np.mean(samples.contains_eos)) if samples.kl.size else math.nan
    return block


@dataclass
class EvalResult:
    """Reference vs trained policy on held-out prompts: summary.json numbers and one row per prompt."""

    summary: dict[str, Any]
    samples: pd.DataFrame
    win: WinRate
    generation: dict[str, Any]
    n_table_rows: int = 8
    reference_cached: bool = False  # the reference's samples and scores were read from the reference cache


def judge_name(cfg: EvalConfig, has_gold: bool) -> str:
    """'gold' or 'rm': who decides wins (auto = gold when it exists)."""
    if cfg.win_rate_judge == "gold" and not has_gold:
        raise ValueError(
            "win_rate_judge='gold' but data/report.json has no gold_scorer (real preference data has no hidden gold); "
            "set win_rate_judge: auto or rm"
        )
    if cfg.win_rate_judge == "auto":
        return "gold" if has_gold else "rm"
    return cfg.win_rate_judge


@dataclass
class EvalContext:
    """What every evaluation on one run's held-out prompts shares: the evaluation stage, its over-optimisation curve
    and the methods comparison all start from :func:`eval_context`."""

    cfg: EvalConfig
    settings: GenerationSettings  # sampling: response length, temperature, seed, device, dtype
    rows: list[dict[str, Any]]  # held-out prompts (prompt_ids, messages, id)
    tokenizer: Any
    reference: torch.nn.Module  # the reference policy, eval mode, on settings.device
    rm_scorer: RMScorer
    gold_scorer: GoldScorer | None  # None: the data has no gold scorer
    judge: str  # "gold" or "rm": who decides the win rate
    # where the reference's samples and scores are kept (reference_cache); None: the scorers were given, not the run's
    reference_cache: ReferenceCache | None = None
    reward: str = "model"  # what rm_scorer scores with when it is the run's: the saved model, or a combination

    @property
    def prompts(self) -> list[list[int]]:
        return [r["prompt_ids"] for r in self.rows]


def eval_context(
    cfg: EvalConfig,
    run: Run,
    rm_scorer: RMScorer | None = None,
    gold_scorer: GoldScorer | None = None,
    n_prompts: int | None = None,
    needs_policy: bool = False,
) -> EvalContext:
    """Settings, the first ``n_prompts`` held-out prompts (default ``cfg.n_eval_prompts``; 0 = all), tokenizer,
    reference and scorers (the run's reward model -- the base run's with ``common.base_run`` -- and gold by default).

    With the run's own scorers the context also names the reference cache (in the run holding the reward model), so
    :func:`rlhf_lib.evaluate.reference_cache.cached_reference_samples` samples the reference once per prompts and
    settings; given scorers are not known by content, so the reference is then sampled afresh.
    ``needs_policy`` checks that the run has a trained policy before any model is loaded.
    """
    settings = generation_settings(cfg, run)
    rows = load_eval_prompts(run, cfg.n_eval_prompts if n_prompts is None else n_prompts)
    if needs_policy:
        _check_policy_dir(run)
    tokenizer = models.load_tokenizer(cfg.model)
    reference = models.load_causal_lm(cfg.model, tokenizer, settings.device).eval()
    own_scorers = rm_scorer is None and gold_scorer is None
    reward = scoring_reward(cfg, run)
    if rm_scorer is None:
        rm_scorer = reward_model_scorer(run.upstream("reward_model").reward_model_dir, settings, tokenizer, reward)
    if gold_scorer is None:
        gold_scorer = default_gold_scorer(run)
    judge = judge_name(cfg, gold_scorer is not None)
    cache = None
    if own_scorers:
        cache = reference_cache_for(cfg.model, run.upstream("reward_model"), gold_scorer_name(run), reward)
    return EvalContext(cfg, settings, rows, tokenizer, reference, rm_scorer, gold_scorer, judge, cache, reward)


def save_table(df: pd.DataFrame, folder: Path, stem: str) -> list[Path]:
    """Write df as <stem>.csv and <stem>.jsonl under folder (atomically); returns the paths."""
    csv, jsonl = folder / f"{stem}.csv", folder / f"{stem}.jsonl"
    with io.atomic_file(csv) as f:
        df.to_csv(f, index=False)
    with io.atomic_file(jsonl) as f:
        df.to_json(f, orient="records", lines=True, force_ascii=False)
    return [csv, jsonl]


def evaluate_policies(
    cfg: EvalConfig,
    run: Run,
    rm_scorer: RMScorer | None = None,
    gold_scorer: GoldScorer | None = None,
) -> EvalResult:
    """Sample reference and trained policy on the eval prompts (paired seeds), score them, measure KL, win rate.

    The reference's samples and scores come from the reference cache when an earlier evaluation on the same inputs
    left them there (results.json ``reference_cached``)."""
    ctx = eval_context(cfg, run, rm_scorer, gold_scorer, needs_policy=True)
    own_rm = rm_scorer is None
    settings = ctx.settings
    print(
        f"[eval] {len(ctx.rows)} eval prompts, response_length={settings.response_length}, "
        f"temperature={settings.temperature}, seed={settings.seed}, device={settings.device}, dtype={settings.dtype}"
    )
    clock = time.perf_counter()
    before, rm_before, gold_before, reference_cached = cached_reference_samples(ctx, ctx.prompts, desc="reference")
    seconds = {"reference": time.perf_counter() - clock}  # sampled + scored, or read from the cache
    policy = default_policy_loader(cfg, run, ctx.tokenizer, settings.device)(run.policy_dir)
    clock = time.perf_counter()
    after = sample_policy(policy, ctx.tokenizer, ctx.prompts, settings, reference=ctx.reference, desc="trained policy")
    seconds["policy_sampling"] = time.perf_counter() - clock  # generation and the KL's log-probs
    del policy
    gc.collect()
    clock = time.perf_counter()
    rm_after, gold_after = score_samples(after, ctx.rm_scorer, ctx.gold_scorer)
    seconds["policy_scoring"] = time.perf_counter() - clock  # reward model and gold

    judged_after, judged_before = (gold_after, gold_before) if ctx.judge == "gold" else (rm_after, rm_before)
    win = win_rate(
        judged_after, judged_before, cfg.tie_tolerance, cfg.ci_method, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed
    )
    summary = {
        "before": policy_block(before, rm_before, gold_before),
        "after": policy_block(after, rm_after, gold_after),
        "win_rate_vs_ref": win.rate,
        "win_rate_ci": [win.ci_low, win.ci_high],
        "n_eval_prompts": len(ctx.rows),
        "win_rate_judge": ctx.judge,
        "win_rate_ties": win.tie_fraction,
    }
    outcome = pair_outcomes(judged_after, judged_before, cfg.tie_tolerance)
    samples = _samples_frame(ctx.rows, before, after, (rm_before, rm_after), (gold_before, gold_after), outcome)
    result = EvalResult(summary, samples, win, settings.to_dict(), cfg.n_table_rows, reference_cached)
    save_table(samples, run.eval_dir, "samples")
    write_json_atomic(
        run.eval_dir / "results.json",
        {
            "summary": summary,
            "generation": result.generation,
            "win": {**dataclasses.asdict(win), "tie_fraction": win.tie_fraction},
            "reference_cached": reference_cached,
            "reward": ctx.reward if own_rm else "given",
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
        },
    )
    _print_summary(summary)
    return result


def _samples_frame(rows, before: Samples, after: Samples, rm: tuple, gold: tuple, outcome: np.ndarray) -> pd.DataFrame:
    """samples.csv: one row per held-out prompt, reference vs trained response with their scores and the outcome."""
    missing = np.full(len(rows), np.nan)
    return pd.DataFrame(
        {
            "id": [str(r.get("id", i)) for i, r in enumerate(rows)],
            "prompt": [prompt_display_text(r) for r in rows],
            "reference_response": before.texts,
            "trained_response": after.texts,
            "reference_rm": rm[0],
            "trained_rm": rm[1],
            "reference_gold": gold[0] if gold[0] is not None else missing,
            "trained_gold": gold[1] if gold[1] is not None else missing,
            "reference_length": before.lengths,
            "trained_length": after.lengths,
            "reference_eos": before.contains_eos.astype(bool),
            "trained_eos": after.contains_eos.astype(bool),
            "trained_kl": after.kl,
            "outcome": np.select([outcome == 1.0, outcome == 0.5], ["win", "tie"], "loss"),
        }
    )


def _print_summary(summary: dict[str, Any]) -> None:
    b, a = summary["before"], summary["after"]
    for key in ("rm_score", "gold_score", "kl", "length", "eos_fraction"):
        if key in a:
            print(f"[eval] {key:>13}: reference {b[key]:+.4f}  ->  trained {a[key]:+.4f}")
    lo, hi = summary["win_rate_ci"]
    print(
        f"[eval] win rate vs reference ({summary['win_rate_judge']}): {summary['win_rate_vs_ref']:.3f} "
        f"[{lo:.3f}, {hi:.3f}], ties {summary['win_rate_ties']:.3f}, n={summary['n_eval_prompts']}"
    )


def sample_table(result: EvalResult, n: int | None = None) -> pd.DataFrame:
    """Side-by-side table of the first n prompts (file order, not cherry-picked): responses and their scores."""
    n = result.n_table_rows if n is None else n
    df = result.samples.head(n)
    table = pd.DataFrame(
        {
            "prompt": df["prompt"],
            "reference response": df["reference_response"],
            "trained response": df["trained_response"],
            "RM (ref)": df["reference_rm"].round(3),
            "RM (trained)": df["trained_rm"].round(3),
        }
    )
    if df["reference_gold"].notna().any():
        table["gold (ref)"] = df["reference_gold"].round(3)
        table["gold (trained)"] = df["trained_gold"].round(3)
    table["KL"] = df["trained_kl"].round(2)
    table["trained"] = df["outcome"]
    return table.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------
# over-optimisation curve


def select_evenly(items: Sequence[Any], k: int) -> list[Any]:
    """Up to k items evenly spaced through the sequence, always ending with the last one."""
    n = len(items)
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return list(items)
    return [items[math.ceil((i + 1) * n / k) - 1] for i in range(k)]


def final_update(run: Run) -> int | None:
    """The last update number the PPO stage logged (metrics.jsonl `update`), if any."""
    path = run.ppo_dir / "metrics.jsonl"
    if not path.exists():
        return None
    updates = [row["update"] for row in read_jsonl(path, torn_tail_ok=True) if isinstance(row.get("update"), int)]
    return updates[-1] if updates else None


def curve_point(label: str, step: float, samples: Samples, rm: np.ndarray, gold: np.ndarray | None) -> dict[str, Any]:
    """One row of the over-optimisation table."""
    row: dict[str, Any] = {"label": label, "step": step}
    row["kl"], row["kl_std"] = mean_std(samples.kl)
    row["rm_score"], row["rm_score_std"] = mean_std(rm)
    if gold is not None:
        row["gold_score"], row["gold_score_std"] = mean_std(gold)
    row["length"] = float(samples.lengths.mean())
    row["eos_fraction"] = float(samples.contains_eos.mean())
    row["n_prompts"] = len(samples.texts)
    return row


CURVE_COLUMNS = [
    "label",
    "step",
    "kl",
    "kl_std",
    "rm_score",
    "rm_score_std",
    "gold_score",
    "gold_score_std",
    "length",
    "eos_fraction",
    "n_prompts",
]


def curve_checkpoints(run: Run, max_checkpoints: int) -> list[tuple[str, float, Path | None]]:
    """(label, update, folder) of the curve's points: the reference (no folder), up to ``max_checkpoints`` evenly
    spaced PPO checkpoints and the final policy (a checkpoint of the final update is the final policy: once)."""
    last = final_update(run)
    points: list[tuple[str, float, Path | None]] = [("reference", 0.0, None)]
    for path in select_evenly(list_checkpoints(run.checkpoints_dir), max_checkpoints):
        update = checkpoint_update(path)
        if update != last:
            points.append((f"update {update}", float(update), path))
    points.append(("final", float(last) if last is not None else math.nan, run.policy_dir))
    return points


def overoptimisation_curve(
    cfg: EvalConfig,
    run: Run,
    rm_scorer: RMScorer | None = None,
    gold_scorer: GoldScorer | None = None,
    policy_loader: PolicyLoader | None = None,
) -> pd.DataFrame:
    """RM and gold score vs KL: reference, evenly spaced PPO checkpoints, final policy (Gao et al. 2022).

    The reference point's samples are the reference cache's entry for the curve's prompts (their own entry: see
    rlhf_lib.evaluate.reference_cache)."""
    if cfg.max_checkpoints == 0:
        print("[eval] max_checkpoints=0: over-optimisation curve skipped")
        return pd.DataFrame(columns=CURVE_COLUMNS)
    limit = cfg.overopt_prompts or cfg.n_eval_prompts
    if cfg.n_eval_prompts:
        limit = min(limit, cfg.n_eval_prompts)
    ctx = eval_context(cfg, run, rm_scorer, gold_scorer, n_prompts=limit, needs_policy=True)
    load = policy_loader or default_policy_loader(cfg, run, ctx.tokenizer, ctx.settings.device)
    points = curve_checkpoints(run, cfg.max_checkpoints)
    print(f"[eval] over-optimisation curve: {len(points)} points x {len(ctx.prompts)} prompts")

    records = []
    for label, step, path in points:
        if path is None:
            model = ctx.reference
            samples, rm, gold, _ = cached_reference_samples(ctx, ctx.prompts, desc=label)
        else:
            model = load(path)
            samples = sample_policy(
                model, ctx.tokenizer, ctx.prompts, ctx.settings, reference=ctx.reference, desc=label
            )
            rm, gold = score_samples(samples, ctx.rm_scorer, ctx.gold_scorer)
        records.append(curve_point(label, step, samples, rm, gold))
        gold_text = f", gold {records[-1]['gold_score']:+.3f}" if gold is not None else ""
        print(f"[eval]   {label:>12}: KL {records[-1]['kl']:.3f}, RM {records[-1]['rm_score']:+.3f}{gold_text}")
        if model is not ctx.reference:
            del model
            gc.collect()
    curve = pd.DataFrame(records).reindex(columns=[c for c in CURVE_COLUMNS if c in records[0]])
    save_table(curve, run.eval_dir, "overoptimisation")
    return curve


def stage_summary(result: EvalResult, curve: pd.DataFrame | None = None) -> dict[str, Any]:
    """summary.json["eval"]: the headline numbers, plus the over-optimisation points when a curve was made."""
    summary = dict(result.summary)
    if curve is not None and len(curve):
        summary["overoptimisation"] = json.loads(curve.to_json(orient="records"))
    return summary


# ----------------------------------------------------------------------------------------------------------------
# comparing runs

_PARAMS_IGNORED = {"run", "outputs_dir", "overwrite", "compare_runs"}


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    """Scalar leaves of nested dicts as dotted keys; short lists of numbers as key.0, key.1, ..."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    elif isinstance(obj, (list, tuple)):
        if 0 < len(obj) <= 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            for i, value in enumerate(obj):
                out[f"{prefix}.{i}"] = value
    elif obj is None or isinstance(obj, (int, float, str, bool)):
        out[prefix] = obj


def _run_params(manifest: dict[str, Any]) -> dict[str, Any]:
    """Every stage's parameters as params.<key> (common ones) or params.<stage>.<key>."""
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    out: dict[str, Any] = {}
    for stage, info in manifest.get("stages", {}).items():
        for key, value in (info.get("params") or {}).items():
            if key in _PARAMS_IGNORED:
                continue
            name = f"params.{key}" if key in common else f"params.{stage}.{key}"
            out.setdefault(name, str(value) if isinstance(value, (list, dict)) else value)
    return out


def comparison_run_dirs(cfg: EvalConfig, run: Run) -> list[Path]:
    """This run followed by cfg.compare_runs (each a run name under outputs_dir, or a run folder)."""
    dirs = [run.root]
    for entry in cfg.compare_runs:
        path = Path(entry).expanduser()
        candidate = path if (path / "manifest.json").exists() else run.root.parent / entry
        if not (candidate / "manifest.json").exists():
            raise FileNotFoundError(
                f"compare_runs entry {entry!r}: {candidate} is not a run folder (no manifest.json); give a run name "
                f"under {run.root.parent} or the path of a run folder"
            )
        if candidate.resolve() != run.root.resolve():
            dirs.append(candidate)
    return dirs


def compare_runs(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run: stage statuses, parameters that differ between runs, and every headline number.

    A run whose eval stage has not finished yet (e.g. the run being evaluated) contributes eval/results.json.
    """
    rows, params = [], []
    for entry in run_dirs:
        root = Path(entry).expanduser()
        run = Run(root)
        if not run.manifest_path.exists():
            raise FileNotFoundError(f"{root}: no manifest.json; is it a run folder (outputs/<run>)?")
        summary = run.summary()
        if "eval" not in summary:
            pending = read_json(run.eval_dir / "results.json", {}) or {}
            if "summary" in pending:
                summary["eval"] = pending["summary"]
        if isinstance(summary.get("eval"), dict):
            summary["eval"] = {k: v for k, v in summary["eval"].items() if k != "overoptimisation"}
        manifest = run.manifest()
        row: dict[str, Any] = {"run": run.name}
        for stage, info in manifest.get("stages", {}).items():
            row[f"status.{stage}"] = info.get("status")
        flat: dict[str, Any] = {}
        _flatten("", summary, flat)
        row.update(flat)
        rows.append(row)
        params.append(_run_params(manifest))
    df = pd.DataFrame(rows)
    if len(rows) > 1:
        pdf = pd.DataFrame(params)
        differing = [c for c in pdf.columns if pdf[c].astype(str).nunique(dropna=False) > 1]
        df = pd.concat([df[["run"]], pdf[differing], df.drop(columns="run")], axis=1)
    return df.set_index("run")
