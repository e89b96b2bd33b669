"""Tests for rlhf_lib.evaluate (stage, sampling, stats, plots): metrics on hand-made inputs,
sampling/scoring on tiny:llama, plots.

Scorers are injected (simple functions of the tokens / text), so these tests need neither a trained reward model nor
the annotator; policies are tiny:llama copies written as Hugging Face folders, as the PPO stage writes them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rlhf_lib.core import config
from rlhf_lib.core.io import write_json_atomic
from rlhf_lib.core.runs import Run, run_for
from rlhf_lib.evaluate import plots, reference_cache
from rlhf_lib.evaluate.sampling import GenerationSettings, pad_batch, response_logprobs, sample_policy
from rlhf_lib.evaluate.stage import (
    EvalConfig,
    EvalResult,
    compare_runs,
    comparison_run_dirs,
    evaluate_policies,
    generation_settings,
    overoptimisation_curve,
    sample_table,
    select_evenly,
    stage_summary,
)
from rlhf_lib.evaluate.stats import bootstrap_interval, mean_std, sequence_kl, wilson_interval, win_rate
from rlhf_lib.lm import models
from rlhf_lib.ppo import plots as ppo_plots

TINY = "tiny:llama"
USER_PROMPTS = [
    "Write a short review of a film.",
    "Review a cafe.",
    "Write a short review of a pair of running shoes you bought last month.",
    "Hi",
    "Write a short review of a book about the sea and its old sailors.",
]


# ----------------------------------------------------------------------------------------------------------------
# pure metrics


def test_sequence_kl_sums_valid_tokens_only_and_matches_a_loop():
    logp = torch.tensor([[-1.0, -2.0, -0.5, float("nan")], [-0.3, -0.1, -4.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, float("-inf")], [-0.2, -0.4, -1.0, -2.5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    expected = []
    for b in range(2):
        expected.append(sum(float(logp[b, t] - ref[b, t]) for t in range(4) if mask[b, t]))
    out = sequence_kl(logp, ref, mask)
    assert out.shape == (2,)
    assert torch.allclose(out, torch.tensor(expected))
    assert out.tolist() == pytest.approx([0.5 - 1.0 + 0.0, -0.1 + 0.3])
    assert torch.equal(sequence_kl(logp, logp, mask), torch.zeros(2))  # identical policies: exactly 0, nan ignored


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # sample std (ddof=1)
    assert mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_wilson_interval_known_value():
    # 8 of 10, 95% (z = 1.95996): centre 0.71674, half-width 0.22657 -> [0.4902, 0.9433], by hand
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)
    lo0, hi0 = wilson_interval(0, 10)
    assert lo0 == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < hi0 < 0.35  # unlike the normal interval, not degenerate at p = 0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.62, 0.95])
def test_wilson_interval_contains_estimate_and_shrinks_with_n(p):
    widths = []
    for n in (20, 200, 2000):
        lo, hi = wilson_interval(p * n, n)
        assert 0.0 <= lo <= p <= hi <= 1.0
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < 0.05


def test_win_rate_of_a_policy_against_itself_is_half_with_all_ties():
    scores = np.random.default_rng(0).normal(size=50)
    for method in ("wilson", "bootstrap"):
        w = win_rate(scores, scores.copy(), ci_method=method)
        assert w.rate == 0.5 and w.ties == 50 and w.wins == w.losses == 0 and w.tie_fraction == 1.0
        assert w.ci_low <= 0.5 <= w.ci_high


def test_win_rate_counts_ties_as_half_and_uses_the_tolerance():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 2.0, 5.0, 1.0, 4.95]
    w = win_rate(a, b)
    assert (w.wins, w.ties, w.losses, w.n) == (3, 1, 1, 5)
    assert w.rate == pytest.approx(3.5 / 5)
    assert (w.ci_low, w.ci_high) == pytest.approx(wilson_interval(3.5, 5))
    w_tol = win_rate(a, b, tie_tolerance=0.1)  # 5.0 vs 4.95 becomes a tie
    assert (w_tol.wins, w_tol.ties, w_tol.losses) == (2, 2, 1)
    assert w_tol.rate == pytest.approx(3.0 / 5)
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0, 2.0], [1.0])


def test_bootstrap_interval_contains_the_mean_and_shrinks():
    rng = np.random.default_rng(1)
    small = rng.choice([0.0, 0.5, 1.0], size=30, p=[0.3, 0.1, 0.6])
    large = rng.choice([0.0, 0.5, 1.0], size=3000, p=[0.3, 0.1, 0.6])
    lo_s, hi_s = bootstrap_interval(small, seed=0)
    lo_l, hi_l = bootstrap_interval(large, seed=0)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    assert bootstrap_interval(np.full(10, 0.5)) == (0.5, 0.5)


def test_select_evenly_ends_with_the_last_item():
    items = list(range(1, 11))
    assert select_evenly(items, 1) == [10]
    assert select_evenly(items, 2) == [5, 10]
    assert select_evenly(items, 4) == [3, 5, 8, 10]
    assert select_evenly(items, 20) == items
    assert select_evenly(items, 0) == [] and select_evenly([], 3) == []


def test_pad_batch_both_sides():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_eval_config_checks_and_documents_every_field():
    with pytest.raises(ValueError, match="temperature"):
        EvalConfig(temperature=0.0).check()
    with pytest.raises(ValueError, match="win_rate_judge"):
        EvalConfig(win_rate_judge="human").check()
    with pytest.raises(config.ConfigError, match="ci_method"):
        config.validate(EvalConfig, {"ci_method": "normal"}, "test")
    comments = config.field_comments(EvalConfig)
    for f in EvalConfig.__dataclass_fields__:
        assert comments.get(f), f"field {f} has no comment"


# ----------------------------------------------------------------------------------------------------------------
# sampling and scoring on tiny:llama


def rm_scorer(sequences: list[list[int]]) -> np.ndarray:
    """A deterministic stand-in reward model: a function of the last tokens."""
    return np.array([float(np.mean(s[-4:]) % 101) for s in sequences])


def gold_scorer(texts: list[str]) -> list[float]:
    """A deterministic stand-in gold score of the text."""
    return [len(set(t)) / 10.0 for t in texts]


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(TINY)


def make_cfg(outputs: str, **overrides) -> EvalConfig:
    values = dict(
        run="ev",
        outputs_dir=outputs,
        model=TINY,
        device="cpu",
        dtype="float32",
        threads=1,
        seed=3,
        response_length=6,
        temperature=1.0,
        batch_size=2,
        max_checkpoints=2,
        overopt_prompts=3,
    )
    values.update(overrides)
    cfg = EvalConfig(**values)
    cfg.check()
    return cfg


def save_policy(path: Path, tokenizer, noise: float = 0.0, seed: int = 0) -> None:
    """A tiny:llama copy as a HF folder; noise > 0 perturbs every weight (a 'trained' policy)."""
    if noise == 0.0:
        shutil.copytree(models.resolve_model_ref(TINY), path)
        return
    model = models.load_causal_lm(TINY, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def make_run(outputs: str, tokenizer, gold: str | None = "vader", policy_noise: float = 0.0) -> tuple[EvalConfig, Run]:
    cfg = make_cfg(outputs)
    run = run_for(cfg)
    run.data_dir.mkdir(parents=True)
    with open(run.data_dir / "eval_prompts.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(USER_PROMPTS):
            messages = [{"role": "user", "content": text}]
            prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            row = {"id": f"p{i}", "prompt": messages, "prompt_text": prompt_text, "prompt_ids": ids}
            f.write(json.dumps(row) + "\n")
    write_json_atomic(run.data_dir / "report.json", {"gold_scorer": gold})
    save_policy(run.policy_dir, tokenizer, noise=policy_noise)
    write_json_atomic(
        run.manifest_path,
        {
            "run": run.name,
            "stages": {
                s: {"status": "done", "params": {"model": TINY, "seed": 3}} for s in ("data", "reward_model", "ppo")
            },
        },
    )
    return cfg, run


@pytest.fixture(scope="module")
def same_policy(tmp_path_factory, tokenizer):
    """Evaluation of a 'trained' policy that is exactly the reference."""
    cfg, run = make_run(str(tmp_path_factory.mktemp("same")), tokenizer)
    return cfg, run, evaluate_policies(cfg, run, rm_scorer=rm_scorer, gold_scorer=gold_scorer)


def settings(**overrides) -> GenerationSettings:
    values = dict(
        response_length=5, temperature=0.9, batch_size=3, seed=0, device=torch.device("cpu"), dtype=torch.float32
    )
    values.update(overrides)
    return GenerationSettings(**values)


def test_response_logprobs_batched_with_left_padding_match_unpadded_rows(tokenizer):
    model = models.load_causal_lm(TINY, tokenizer).eval()
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a b c d e f g", "hello", "x y z")]
    query, qmask = pad_batch(prompts, tokenizer.pad_token_id, "left")
    responses = torch.tensor([[10, 11, 12, 2], [20, 21, 0, 0], [30, 31, 32, 33]])
    rmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    batched = response_logprobs(model, query, qmask, responses, rmask, temperature=0.7)  # (3, 4)
    for b, prompt in enumerate(prompts):
        n = int(rmask[b].sum())
        ids = torch.tensor([prompt + responses[b, :n].tolist()])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (n, V)
        expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, responses[b, :n, None]).squeeze(-1)
        assert torch.allclose(batched[b, :n], expected, atol=1e-4), b


def test_sampling_is_paired_by_seed_and_truncated_after_eos(tokenizer):
    model = models.load_causal_lm(TINY, tokenizer).eval()
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in USER_PROMPTS]
    a = sample_policy(model, tokenizer, prompts, settings())
    b = sample_policy(model, tokenizer, prompts, settings())
    assert a.response_ids == b.response_ids  # seed reset inside: paired samples
    assert all(len(r) <= 5 for r in a.response_ids) and (a.kl == 0).all()
    eos = tokenizer.eos_token_id
    for ids, finished in zip(a.response_ids, a.contains_eos):
        assert (eos in ids) == bool(finished)
        if finished:
            assert ids.index(eos) == len(ids) - 1  # nothing kept after the first EOS
    c = sample_policy(model, tokenizer, prompts, settings(seed=1))
    assert c.response_ids != a.response_ids


def test_identical_policy_gives_zero_kl_and_half_win_rate_with_all_ties(same_policy):
    cfg, run, result = same_policy
    s = result.summary
    assert set(s) == {
        "before",
        "after",
        "win_rate_vs_ref",
        "win_rate_ci",
        "n_eval_prompts",
        "win_rate_judge",
        "win_rate_ties",
    }
    keys = ["rm_score", "rm_score_std", "gold_score", "gold_score_std", "kl", "length", "eos_fraction"]
    assert list(s["before"]) == keys and list(s["after"]) == keys
    assert s["after"]["kl"] == 0.0 and (result.samples["trained_kl"] == 0.0).all()  # exact: same weights, same inputs
    assert s["before"] == s["after"]
    assert result.samples["reference_response"].tolist() == result.samples["trained_response"].tolist()
    assert s["win_rate_vs_ref"] == 0.5 and s["win_rate_ties"] == 1.0 and s["win_rate_judge"] == "gold"
    lo, hi = s["win_rate_ci"]
    assert lo < 0.5 < hi
    assert s["n_eval_prompts"] == len(USER_PROMPTS)
    assert 0 < s["after"]["length"] <= cfg.response_length
    assert 0.0 <= s["after"]["eos_fraction"] <= 1.0
    # the numbers are what the injected scorers give on the saved texts/lengths
    df = result.samples
    assert s["after"]["gold_score"] == pytest.approx(np.mean(gold_scorer(df["trained_response"].tolist())))
    assert s["after"]["length"] == pytest.approx(df["trained_length"].mean())


def test_eval_outputs_are_written_and_the_table_is_side_by_side(same_policy):
    cfg, run, result = same_policy
    csv = pd.read_csv(run.eval_dir / "samples.csv")
    lines = (run.eval_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(csv) == len(lines) == len(USER_PROMPTS)
    assert json.loads(lines[0])["prompt"] == USER_PROMPTS[0]
    results = json.loads((run.eval_dir / "results.json").read_text())
    assert results["summary"]["win_rate_vs_ref"] == 0.5 and results["generation"]["response_length"] == 6
    table = sample_table(result, n=3)
    assert list(table.columns[:3]) == ["prompt", "reference response", "trained response"]
    assert {"RM (ref)", "RM (trained)", "gold (ref)", "gold (trained)"} <= set(table.columns)
    assert len(table) == 3 and table["prompt"].tolist() == USER_PROMPTS[:3]
    assert set(table["trained"]) == {"tie"}
    summary = stage_summary(result, pd.DataFrame([{"label": "reference", "kl": 0.0}]))
    assert summary["overoptimisation"] == [{"label": "reference", "kl": 0.0}]
    json.dumps(summary)


def test_changed_policy_has_nonzero_kl_and_no_gold_means_rm_judge(tmp_path, tokenizer):
    cfg, run = make_run(str(tmp_path), tokenizer, gold=None, policy_noise=0.05)
    result = evaluate_policies(cfg, run, rm_scorer=rm_scorer)
    s = result.summary
    assert "gold_score" not in s["after"] and s["win_rate_judge"] == "rm"
    assert s["before"]["kl"] == 0.0
    kl = result.samples["trained_kl"].to_numpy()
    assert np.isfinite(kl).all() and (kl != 0).all()
    assert s["after"]["kl"] == pytest.approx(kl.mean())
    assert "gold (ref)" not in sample_table(result).columns
    w = result.win
    assert w.wins + w.ties + w.losses == len(USER_PROMPTS)
    with pytest.raises(ValueError, match="no gold_scorer"):
        evaluate_policies(make_cfg(cfg.outputs_dir, win_rate_judge="gold"), run, rm_scorer=rm_scorer)


def test_generation_settings_default_to_the_ppo_stage(tmp_path):
    cfg = make_cfg(str(tmp_path), response_length=None, temperature=None)
    run = run_for(cfg)
    write_json_atomic(run.manifest_path, {"stages": {"ppo": {"params": {"response_length": 17, "temperature": 0.8}}}})
    got = generation_settings(cfg, run)
    assert (got.response_length, got.temperature, got.seed) == (17, 0.8, cfg.seed)
    got = generation_settings(make_cfg(str(tmp_path), response_length=9, temperature=None), run)
    assert (got.response_length, got.temperature) == (9, 0.8)


def test_missing_inputs_name_the_file_and_the_fix(tmp_path, tokenizer):
    cfg = make_cfg(str(tmp_path))
    run = run_for(cfg)
    with pytest.raises(FileNotFoundError, match="eval_prompts.jsonl.*data stage"):
        evaluate_policies(cfg, run, rm_scorer=rm_scorer)
    run.data_dir.mkdir(parents=True)
    (run.data_dir / "eval_prompts.jsonl").write_text('{"id": "a", "prompt_ids": [1, 2]}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2.*prompt_ids"):
        evaluate_policies(cfg, run, rm_scorer=rm_scorer)


def test_overoptimisation_curve_over_checkpoints(tmp_path, tokenizer):
    cfg, run = make_run(str(tmp_path), tokenizer)
    for step, noise in ((1, 0.01), (2, 0.02), (3, 0.03), (4, 0.04)):
        save_policy(run.checkpoints_dir / f"update_{step:04d}", tokenizer, noise=noise, seed=step)
    run.ppo_dir.mkdir(parents=True)
    # the PPO stage's last update is 4, so checkpoint 4 is the final policy and is not evaluated twice
    logged = [json.dumps({"update": u, "episode": 8 * u}) for u in (1, 2, 3, 4)]
    (run.ppo_dir / "metrics.jsonl").write_text("\n".join(logged))
    loaded = []

    def loader(path: Path):
        loaded.append(path.name)
        return models.load_causal_lm(str(path), tokenizer).eval()

    curve = overoptimisation_curve(cfg, run, rm_scorer=rm_scorer, gold_scorer=gold_scorer, policy_loader=loader)
    assert curve["label"].tolist() == ["reference", "update 2", "final"]
    assert loaded == ["update_0002", "policy"]
    assert curve["step"].tolist() == [0.0, 2.0, 4.0]
    assert curve.loc[0, "kl"] == 0.0 and curve.loc[2, "kl"] == 0.0  # the final policy here equals the reference
    assert curve.loc[1, "kl"] != 0.0 and np.isfinite(curve.loc[1, "kl"])
    assert (curve["n_prompts"] == cfg.overopt_prompts).all()
    assert {"rm_score", "gold_score", "gold_score_std", "length", "eos_fraction"} <= set(curve.columns)
    assert len(pd.read_csv(run.eval_dir / "overoptimisation.csv")) == 3
    # default loader (HF folders) and no checkpoints at all
    shutil.rmtree(run.checkpoints_dir)
    only = overoptimisation_curve(cfg, run, rm_scorer=rm_scorer, gold_scorer=gold_scorer)
    assert only["label"].tolist() == ["reference", "final"]
    assert overoptimisation_curve(make_cfg(str(tmp_path), max_checkpoints=0), run).empty


# ----------------------------------------------------------------------------------------------------------------
# the reference cache


def save_reward_model(path: Path, tokenizer) -> None:
    """A tiny:llama sequence classifier (num_labels=1) as the reward_model stage saves one."""
    model = models.load_sequence_classifier(TINY, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_json_atomic(path / "reward_stats.json", {"mean": 0.0, "std": 1.0})


def run_with_reward_model(outputs: str, tokenizer) -> tuple[EvalConfig, Run]:
    """A run with a 'trained' policy, a saved reward model and the vader gold: the stage's own scorers, no stand-ins."""
    cfg, run = make_run(outputs, tokenizer, policy_noise=0.05)
    save_reward_model(run.reward_model_dir, tokenizer)
    return cfg, run


def eval_outputs(run: Run) -> dict[str, object]:
    """What an evaluation leaves: results.json without the cache flag and wall-clock phases, and its tables' bytes."""
    results = json.loads((run.eval_dir / "results.json").read_text())
    results.pop("reference_cached")
    assert set(results.pop("seconds")) == {"reference", "policy_sampling", "policy_scoring"}
    names = ("samples.csv", "samples.jsonl", "overoptimisation.csv", "overoptimisation.jsonl")
    return {"results": results, **{n: (run.eval_dir / n).read_bytes() for n in names}}


def count_reference_sampling(monkeypatch) -> list[int]:
    """Count the reference cache's calls of the sampler (each a reference sampled afresh)."""
    calls: list[int] = []
    real = reference_cache.sample_policy

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_cache, "sample_policy", counted)
    return calls


def test_cached_reference_gives_exactly_the_sampled_evaluation_and_is_shared_by_runs_on_the_base(
    tmp_path, tokenizer, monkeypatch
):
    cfg, run = run_with_reward_model(str(tmp_path), tokenizer)
    calls = count_reference_sampling(monkeypatch)
    sampled = evaluate_policies(cfg, run)
    sampled_curve = overoptimisation_curve(cfg, run)
    assert calls == [len(USER_PROMPTS), cfg.overopt_prompts]  # the curve's prefix is its own entry, sampled itself
    assert not sampled.reference_cached
    assert json.loads((run.eval_dir / "results.json").read_text())["reference_cached"] is False
    assert len(list((run.root / reference_cache.CACHE_DIR).glob("*.json"))) == 2
    first = eval_outputs(run)
    assert first["results"]["summary"]["win_rate_judge"] == "gold"  # the data's vader gold, not a stand-in
    assert 0 < first["results"]["summary"]["after"]["kl"]  # a policy unlike the reference: the pairs differ

    again = evaluate_policies(cfg, run)
    again_curve = overoptimisation_curve(cfg, run)
    assert calls == [len(USER_PROMPTS), cfg.overopt_prompts]  # both read from the cache, nothing sampled
    assert again.reference_cached
    assert json.loads((run.eval_dir / "results.json").read_text())["reference_cached"] is True
    assert eval_outputs(run) == first  # the same bytes of every table, the same numbers
    assert again.summary == sampled.summary
    pd.testing.assert_frame_equal(again.samples, sampled.samples)
    pd.testing.assert_frame_equal(again_curve, sampled_curve)

    # a run on this base (common.base_run) reads the base's reward model, so it reads the base's cache
    other = Run(tmp_path / "on-base")
    save_policy(other.policy_dir, tokenizer, noise=0.05, seed=1)
    manifest = run.manifest()
    manifest["base_run"] = {"name": run.name, "root": str(run.root.resolve()), "stages": {}}
    write_json_atomic(other.manifest_path, manifest)
    on_base = evaluate_policies(make_cfg(str(tmp_path), run="on-base"), other)
    assert on_base.reference_cached and calls == [len(USER_PROMPTS), cfg.overopt_prompts]
    assert not (other.root / reference_cache.CACHE_DIR).exists()
    assert on_base.samples["reference_response"].tolist() == sampled.samples["reference_response"].tolist()

    # other sampling settings are other entries; given scorers are not known by content, so never cached
    evaluate_policies(make_cfg(str(tmp_path), batch_size=3), run)
    assert calls[-1] == len(USER_PROMPTS) and len(calls) == 3
    given = evaluate_policies(cfg, run, rm_scorer=rm_scorer, gold_scorer=gold_scorer)
    assert not given.reference_cached and len(calls) == 4
    assert len(list((run.root / reference_cache.CACHE_DIR).glob("*.json"))) == 3


@pytest.mark.parametrize("damage", ["truncated", "not_json", "short"])
def test_a_damaged_cache_file_is_resampled_and_replaced(tmp_path, tokenizer, monkeypatch, capsys, damage):
    cfg, run = run_with_reward_model(str(tmp_path), tokenizer)
    sampled = evaluate_policies(cfg, run)
    (path,) = (run.root / reference_cache.CACHE_DIR).glob("*.json")
    good = path.read_text()
    if damage == "truncated":
        path.write_text(good[: len(good) // 2])  # a write cut short
    elif damage == "not_json":
        path.write_bytes(b"\xff\x00 not json")
    else:  # whole JSON under the right key, but one response short
        record = json.loads(good)
        record["texts"] = record["texts"][:-1]
        path.write_text(json.dumps(record))
    calls = count_reference_sampling(monkeypatch)
    capsys.readouterr()
    again = evaluate_policies(cfg, run)
    logged = [line for line in capsys.readouterr().out.splitlines() if "ignoring unreadable cache file" in line]
    assert len(logged) == 1 and str(path) in logged[0]
    assert calls == [len(USER_PROMPTS)] and not again.reference_cached
    assert again.summary == sampled.summary
    assert path.read_text() == good  # replaced by the whole entry
    assert evaluate_policies(cfg, run).reference_cached and len(calls) == 1


def test_the_cache_key_changes_with_every_input(tmp_path, tokenizer):
    base = dict(
        reference={"model": TINY, "sha256": "a" * 64},
        prompt_ids=[[1, 2, 3], [4, 5]],
        generation=settings().to_dict(),
        reward_model="b" * 64,
        gold_scorer="vader",
        environment={"torch": "2.0", "transformers": "4.0", "tokenizers": "0.1", "cpu": "x", "threads": 1},
        version=reference_cache.CACHE_FORMAT,
    )
    changed = {
        "reference": [{"model": "tiny:gpt2", "sha256": "a" * 64}, {"model": TINY, "sha256": "c" * 64}],
        "prompt_ids": [[[1, 2, 3]], [[1, 2, 3], [4, 6]], [[4, 5], [1, 2, 3]]],
        "generation": [
            settings(**{k: v}).to_dict()
            for k, v in (
                ("response_length", 6),
                ("temperature", 0.7),
                ("batch_size", 2),
                ("seed", 1),
                ("device", torch.device("cuda")),
                ("dtype", torch.bfloat16),
            )
        ],
        "reward_model": ["c" * 64],
        "gold_scorer": [None, "other"],
        "environment": [{**base["environment"], "torch": "2.1"}, {**base["environment"], "threads": 2}],
        "version": [reference_cache.CACHE_FORMAT + 1],
    }
    assert set(changed) == set(base)
    keys = [reference_cache.cache_key(**base)]
    for name, values in changed.items():
        for value in values:
            keys.append(reference_cache.cache_key(**{**base, name: value}))
    assert len(set(keys)) == len(keys) == 1 + sum(len(v) for v in changed.values())
    assert reference_cache.cache_key(**base) == keys[0]  # and it is a function of its inputs only

    # the folder hashes behind the reference and reward_model inputs follow the files' bytes
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    before = reference_cache.folder_sha256(folder)
    (folder / "model.safetensors").write_bytes(b"weightz")
    assert reference_cache.folder_sha256(folder) != before
    owner = Run(tmp_path / "owner")
    owner.reward_model_dir.mkdir(parents=True)
    (owner.reward_model_dir / "model.safetensors").write_bytes(b"rm")
    rm_before = reference_cache.reward_model_sha256(owner)
    (owner.reward_model_dir / "model.safetensors").write_bytes(b"rn")
    assert reference_cache.reward_model_sha256(owner) != rm_before


# ----------------------------------------------------------------------------------------------------------------
# comparison and plots


def fake_run(outputs: Path, name: str, kl_coef: float, gold_after: float, eval_done: bool = True) -> Path:
    run = Run(outputs / name)
    params = {"run": name, "model": TINY, "seed": 0}
    write_json_atomic(
        run.manifest_path,
        {
            "run": name,
            "stages": {
                "data": {"status": "done", "params": {**params, "n_prompts": 64}},
                "ppo": {"status": "done", "params": {**params, "kl_coef": kl_coef}},
                "eval": {"status": "done" if eval_done else "running", "params": params},
            },
        },
    )
    ev = {
        "before": {
            "rm_score": 0.1,
            "rm_score_std": 1.0,
            "gold_score": 0.4,
            "gold_score_std": 0.5,
            "kl": 0.0,
            "length": 40.0,
            "eos_fraction": 0.3,
        },
        "after": {
            "rm_score": 0.9,
            "rm_score_std": 1.0,
            "gold_score": gold_after,
            "gold_score_std": 0.4,
            "kl": 1 / kl_coef,
            "length": 42.0,
            "eos_fraction": 0.4,
        },
        "win_rate_vs_ref": 0.6,
        "win_rate_ci": [0.5, 0.7],
        "n_eval_prompts": 64,
        "win_rate_judge": "gold",
        "win_rate_ties": 0.02,
        "overoptimisation": [{"label": "reference", "kl": 0.0}],
    }
    summary = {"data": {"n_train_pairs": 100}, "ppo": {"objective/scores": 0.5}}
    if eval_done:
        summary["eval"] = ev
    else:
        write_json_atomic(run.eval_dir / "results.json", {"summary": ev})
    write_json_atomic(run.summary_path, summary)
    return run.root


def test_compare_runs_table(tmp_path):
    a = fake_run(tmp_path, "beta_0.05", 0.05, 0.7)
    b = fake_run(tmp_path, "beta_0.2", 0.2, 0.55, eval_done=False)  # eval not finished: read from eval/results.json
    df = compare_runs([a, b])
    assert df.index.tolist() == ["beta_0.05", "beta_0.2"]
    assert df.loc["beta_0.2", "eval.after.gold_score"] == 0.55
    assert df.loc["beta_0.05", "eval.after.kl"] == pytest.approx(20.0)
    assert df.loc["beta_0.05", "eval.win_rate_ci.1"] == 0.7
    assert "params.ppo.kl_coef" in df.columns and "params.seed" not in df.columns  # only parameters that differ
    assert df.loc["beta_0.2", "status.eval"] == "running"
    assert not any("overoptimisation" in c for c in df.columns)
    cfg = make_cfg(str(tmp_path), run="beta_0.05", compare_runs=["beta_0.2", str(a)])
    assert comparison_run_dirs(cfg, run_for(cfg)) == [a, b]
    with pytest.raises(FileNotFoundError, match="nope"):
        comparison_run_dirs(make_cfg(str(tmp_path), run="beta_0.05", compare_runs=["nope"]), run_for(cfg))


def axes_with_data(fig) -> int:
    return sum(1 for ax in fig.axes if ax.lines or ax.patches or ax.collections)


def test_plot_ppo_curves(tmp_path):
    run = Run(tmp_path / "r")
    run.ppo_dir.mkdir(parents=True)
    rows = [
        {
            "episode": 8 * i,
            "objective/scores": 0.1 * i,
            "objective/kl": 0.05 * i,
            "objective/entropy": 30 - i,
            "loss/value_avg": 1 / (i + 1),
            "policy/clipfrac_avg": 0.1,
            "val/clipfrac_avg": 0.2,
        }
        for i in range(40)
    ]
    rows[3].pop("val/clipfrac_avg")
    (run.ppo_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    fig = ppo_plots.plot_ppo_curves(run)
    assert (run.plots_dir / "ppo_curves.png").stat().st_size > 1000
    assert axes_with_data(fig) == 6
    assert fig.axes[0].lines[0].get_xdata()[-1] == 8 * 39
    (run.ppo_dir / "metrics.jsonl").write_text(json.dumps({"episode": 8, "objective/scores": 0.3}))
    fig = ppo_plots.plot_ppo_curves(run)
    assert axes_with_data(fig) == 1  # the others say "not logged"
    with pytest.raises(FileNotFoundError, match="ppo stage"):
        ppo_plots.plot_ppo_curves(Run(tmp_path / "empty"))


def test_draw_ppo_curves_from_rows_and_from_a_jsonl_file(tmp_path):
    """The docs' figure draws metric rows (or a metrics.jsonl) without a run; plot_ppo_curves draws the same lines."""
    rows = [{"episode": 16 * i, "objective/scores": 0.2 * i, "objective/kl": 0.1 * i} for i in range(1, 5)]
    fig = ppo_plots.draw_ppo_curves(rows, "PPO training (test)")
    assert fig._suptitle.get_text() == "PPO training (test)"
    assert axes_with_data(fig) == 2  # scores and KL; the other four panels say "not logged"
    assert list(fig.axes[1].lines[0].get_xdata()) == [16, 32, 48, 64]
    assert list(fig.axes[1].lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    path = tmp_path / "ppo_metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file = ppo_plots.draw_ppo_curves(path)
    assert list(from_file.axes[0].lines[0].get_ydata()) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    run = Run(tmp_path / "r")
    run.ppo_dir.mkdir(parents=True)
    shutil.copy(path, run.ppo_dir / "metrics.jsonl")
    from_run = ppo_plots.plot_ppo_curves(run)
    assert from_run._suptitle.get_text() == "PPO training (r)"
    assert [list(ax.lines[0].get_ydata()) for ax in from_run.axes if ax.lines] == [
        list(ax.lines[0].get_ydata()) for ax in from_file.axes if ax.lines
    ]
    with pytest.raises(FileNotFoundError, match="ppo stage"):
        ppo_plots.draw_ppo_curves(tmp_path / "missing.jsonl")


def test_plot_reward_distributions(same_policy, tmp_path):
    _, _, result = same_policy
    run = Run(tmp_path / "r")
    fig = plots.plot_reward_distributions(result, run)
    assert (run.plots_dir / "reward_distributions.png").stat().st_size > 1000
    assert len(fig.axes) == 2 and axes_with_data(fig) == 2
    no_gold = EvalResult(
        result.summary, result.samples.assign(reference_gold=np.nan, trained_gold=np.nan), result.win, result.generation
    )
    assert len(plots.plot_reward_distributions(no_gold, run).axes) == 1


def test_plot_frontier(tmp_path):
    run = Run(tmp_path / "r")
    curve = pd.DataFrame(
        {
            "label": ["reference", "update 2", "update 4", "final"],
            "step": [0, 2, 4, 6],
            "kl": [0.0, 1.0, 3.0, 6.0],
            "kl_std": [0.0, 0.5, 1.0, 2.0],
            "rm_score": [0.0, 0.5, 1.0, 1.4],
            "rm_score_std": [1.0] * 4,
            "gold_score": [0.4, 0.55, 0.6, 0.58],
            "gold_score_std": [0.5] * 4,
            "n_prompts": [16] * 4,
        }
    )
    fig = plots.plot_frontier(curve, run)
    assert (run.plots_dir / "kl_reward_frontier.png").stat().st_size > 1000
    assert axes_with_data(fig) == 3
    gains = fig.axes[2].lines[1].get_ydata()  # gold gain over the reference in reference std units
    assert np.allclose(gains, [0.0, 0.3, 0.4, 0.36])
    fig = plots.plot_frontier(curve.drop(columns=["gold_score", "gold_score_std"]), run)
    assert len(fig.axes) == 1 and axes_with_data(fig) == 1


def test_plot_run_comparison(tmp_path):
    df = compare_runs([fake_run(tmp_path, "a", 0.05, 0.7), fake_run(tmp_path, "b", 0.2, 0.55)])
    run = Run(tmp_path / "a")
    fig = plots.plot_run_comparison(df, run)
    assert (run.plots_dir / "run_comparison.png").stat().st_size > 1000
    assert axes_with_data(fig) == 4
    heights = [p.get_height() for p in fig.axes[2].patches]
    assert heights == pytest.approx([0.6, 0.6])
