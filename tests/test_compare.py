"""Tests for rlhf_lib.compare: gold at matched KL on hand-made points, profile validation, PPO cost accounting, the
notebook being in step with its generator, one writer per comparison run, and (slow) a whole comparison on the toy
task with injected scorers, re-run to show that finished trainings and evaluations are reused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import toy_task
import yaml

from rlhf_lib.compare import report
from rlhf_lib.compare import runner as compare
from rlhf_lib.core import runlock
from rlhf_lib.core.config import ConfigError
from rlhf_lib.core.io import write_json_atomic
from rlhf_lib.core.runs import Run
from rlhf_lib.lm import models

ROOT = Path(__file__).resolve().parents[1]


def test_interpolation_on_hand_made_points():
    pts = [(4.0, 0.8), (0.0, 0.5), (2.0, 0.7)]  # unsorted on purpose
    assert compare.interpolate_at(pts, 1.0) == pytest.approx(0.6)
    assert compare.interpolate_at(pts, 3.0) == pytest.approx(0.75)
    assert compare.interpolate_at(pts, 4.0) == pytest.approx(0.8)  # an end point is inside
    assert compare.interpolate_at(pts, 6.0) is None  # outside the curve's KL range
    assert compare.interpolate_at([(2.0, 0.7), (3.0, None)], 2.5) is None  # points without gold are dropped
    assert compare.interpolate_at([], 1.0) is None


def test_gold_at_kl_per_curve_with_the_reference_as_anchor():
    entries = [
        {"method": "reference", "kl": 0.0, "gold_score": 0.5},
        {"method": "dpo", "curve": "dpo", "kl": 2.0, "gold_score": 0.7},
        {"method": "dpo", "curve": "dpo", "kl": 8.0, "gold_score": 0.4},
        {"method": "best_of_n", "curve": "best_of_n", "kl": 0.5, "kl_analytic": 1.5, "gold_score": 0.6},
        {"method": "ppo", "curve": "ppo:other", "kl": 3.0, "gold_score": 0.9},
    ]
    out = compare.gold_at_kl(entries, [1.0, 3.0, 6.0], anchor=entries[0])
    assert set(out) == {"dpo", "best_of_n", "ppo:other"}
    assert out["dpo"] == pytest.approx({"1": 0.6, "3": 0.65, "6": 0.5})
    assert out["ppo:other"]["1"] == pytest.approx(0.5 + 0.4 / 3) and out["ppo:other"]["6"] is None
    assert out["best_of_n"] == {"1": None, "3": None, "6": None}  # measured KL 0.5: nothing at >= 1 nat
    no_anchor = compare.gold_at_kl(entries, [1.0], anchor=None)
    assert no_anchor["dpo"]["1"] is None  # without the reference, the DPO curve starts at 2 nats
    table = report.kl_table({"gold_at_kl": out})
    assert list(table.index) == ["ppo:other", "dpo", "best_of_n"]  # ranked by gold at 3 nats, missing last


def fake_run(root: Path, stages: dict[str, str], model: str = "tiny:llama") -> Run:
    run = Run(root)
    write_json_atomic(
        run.manifest_path, {"stages": {s: {"status": st, "params": {"model": model}} for s, st in stages.items()}}
    )
    return run


def write_profile(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def test_profile_validation_names_the_problem(tmp_path):
    outputs = tmp_path / "outputs"
    fake_run(outputs / "base", {"data": "done", "reward_model": "done"})
    fake_run(outputs / "half", {"data": "done", "reward_model": "running"})
    common = {"outputs_dir": str(outputs)}
    with pytest.raises(ConfigError, match="unknown sections"):
        compare.load_profile(write_profile(tmp_path, common=common, bogus={}), base_run="base")
    with pytest.raises(ConfigError, match="no base run"):
        compare.load_profile(write_profile(tmp_path, common=common))
    with pytest.raises(ConfigError, match="reward_model.*has not finished"):
        compare.load_profile(write_profile(tmp_path, common=common), base_run="half")
    with pytest.raises(ConfigError, match="not a run folder"):
        compare.load_profile(write_profile(tmp_path, common=common), base_run="missing")
    with pytest.raises(ConfigError, match="lr_rate"):
        compare.load_profile(write_profile(tmp_path, common=common, dpo={"lr_rate": 1.0}), base_run="base")
    profile = compare.load_profile(write_profile(tmp_path, common=common, dpo={"betas": [0.2]}), base_run="base")
    assert profile.compare.model == "tiny:llama" and profile.eval.model == "tiny:llama"  # the base run's model
    assert profile.dpo.betas == [0.2]


def test_a_run_on_a_base_run_compares_on_the_base_runs_data_and_reward_model(tmp_path):
    outputs = tmp_path / "outputs"
    base = fake_run(outputs / "sweep" / "base", {"data": "done", "reward_model": "running"}, model="tiny:gpt2")
    point = fake_run(outputs / "sweep" / "seed1", {"ppo": "done", "eval": "done"}, model="tiny:gpt2")
    manifest = json.loads(point.manifest_path.read_text())
    write_json_atomic(point.manifest_path, {**manifest, "base_run": {"name": "base", "root": str(base.root)}})
    path = write_profile(tmp_path, common={"outputs_dir": str(outputs)})
    with pytest.raises(ConfigError, match=f"base run {base.root}: stage 'reward_model' has not finished"):
        compare.load_profile(path, base_run="sweep/seed1")
    fake_run(base.root, {"data": "done", "reward_model": "done"}, model="tiny:gpt2")
    profile = compare.load_profile(path, base_run="sweep/seed1")
    assert profile.compare.model == "tiny:gpt2"  # recorded by the base's data stage, not by the point
    resolved = compare.resolve_base_run(profile.compare)
    assert resolved.root == point.root and resolved.upstream("reward_model").root == base.root


@pytest.mark.parametrize("profile", sorted((ROOT / "params" / "compare").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profiles_validate(profile, tmp_path):
    fake_run(tmp_path / "base", {"data": "done", "reward_model": "done"})
    loaded = compare.load_profile(profile, base_run="base", outputs_dir=str(tmp_path))
    assert loaded.compare.model == "tiny:llama" and loaded.eval.n_eval_prompts > 0
    assert all(n <= loaded.best_of_n.n_samples for n in loaded.best_of_n.ns)


def test_the_comparison_runs_on_common_threads(tmp_path, monkeypatch):
    import torch

    fake_run(tmp_path / "base", {"data": "done", "reward_model": "done"})
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    profile = compare.load_profile(
        write_profile(tmp_path, common={"outputs_dir": str(tmp_path), "threads": want}), base_run="base"
    )

    def stop(cfg):
        raise RuntimeError("stop here")

    assert compare.load_profile(profile.source, base_run="base", threads=3).compare.threads == 3  # --threads
    monkeypatch.setattr(compare, "resolve_base_run", stop)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            compare.run_comparison(profile)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_methods_markdown_has_one_row_per_entry_with_analytic_kl_for_best_of_n():
    summary = {
        "methods": [
            {"method": "reference", "setting": "", "kl": 0.0, "gold_score": 0.5, "gold_score_se": 0.04},
            {"method": "best_of_n", "setting": "N=4", "kl": 0.6, "kl_analytic": 0.636, "gold_score": 0.64,
             "gold_score_se": 0.03, "rm_score": 1.2, "win_rate_vs_ref": 0.6, "win_rate_ci": [0.51, 0.68],
             "eos_fraction": 0.3, "train_seconds": None},
            {"method": "ppo", "curve": "ppo:seed1", "setting": "final", "kl": 2.9, "gold_score": 0.68,
             "gold_score_se": 0.03, "rm_score": 1.4, "win_rate_vs_ref": 0.65, "win_rate_ci": [0.56, 0.73],
             "eos_fraction": 0.1, "train_seconds": 1523.4},
        ]
    }  # fmt: skip
    lines = report.methods_markdown(summary).splitlines()
    assert len(lines) == 2 + 3 and lines[0].startswith("| method | setting | KL (nats) |")
    assert lines[2].split(" | ")[:4] == ["| reference", "", "0.00", "0.500 ± 0.040"]
    assert (
        "| best_of_n | N=4 | 0.64 (measured 0.60) | 0.640 ± 0.030 | 1.200 | 0.600 [0.510, 0.680] | 0.300 | – |"
        == lines[3]
    )
    assert lines[4].startswith("| ppo:seed1 | final | 2.90 |") and lines[4].endswith("| 0.100 | 1523 |")


def test_frontier_markdown_ranks_curves_by_gold_at_matched_kl_with_each_best_point_and_its_cost():
    def entry(method, setting, kl, gold, seconds=0.0, tokens=0):
        return {"method": method, "setting": setting, "kl": kl, "gold_score": gold, "gold_score_se": 0.02,
                "train_seconds": seconds, "generated_tokens": tokens}  # fmt: skip

    summary = {
        "methods": [
            entry("reference", "", 0.0, 0.5),
            entry("best_of_n", "N=2", 0.2, 0.56),
            entry("best_of_n", "N=4", 0.6, 0.62),
            entry("ppo", "update 4", 2.0, 0.55, 300.0, 4000),
            entry("ppo", "final", 4.0, 0.70, 900.0, 12000),
            entry("dpo", "beta=0.1", 0.5, 0.52, 600.0),
        ]
    }
    anchor = summary["methods"][0]
    summary["gold_at_kl"] = compare.gold_at_kl(summary["methods"], [0.4, 3.0], anchor)
    lines = report.frontier_markdown(summary).splitlines()
    assert lines[0].startswith("| method | gold @ 0.4 nats | gold @ 3 nats | best gold")
    rows = [line.split(" | ") for line in lines[2:]]
    # at 0.4 nats, on each curve anchored at the reference (0, 0.5): best-of-N 0.56 + 0.06 * 0.5 = 0.590,
    # DPO 0.5 + 0.02 * 0.8 = 0.516, PPO 0.5 + 0.05 * 0.2 = 0.510; at 3 nats only PPO: 0.55 + 0.15 * 0.5 = 0.625
    assert [r[0].strip("| ") for r in rows] == ["best_of_n", "dpo", "ppo"]
    assert rows[0][1:3] == ["0.590", "–"] and rows[1][1] == "0.516" and rows[2][1:3] == ["0.510", "0.625"]
    assert rows[2][3] == "0.700 ± 0.020 (final, 4.00)" and rows[2][4:] == ["900", "12,000 |"]
    assert rows[0][3] == "0.620 ± 0.020 (N=4, 0.60)"


def test_a_ppo_run_on_another_base_is_marked_in_the_summary_and_both_tables(tmp_path, monkeypatch, capsys):
    hashes = {"base": {"data": "d", "reward_model": "rm-a"}, "same": {"data": "d", "reward_model": "rm-a"},
              "other": {"data": "d", "reward_model": "rm-b"}, "unknown": None}  # fmt: skip
    monkeypatch.setattr(compare, "base_stage_hashes", lambda run: hashes[run.root.name])
    base = Run(tmp_path / "base")
    assert not compare.other_base(base, base) and not compare.other_base(Run(tmp_path / "same"), base)
    assert compare.other_base(Run(tmp_path / "other"), base) and compare.other_base(Run(tmp_path / "unknown"), base)
    assert "other: its data / reward-model stages differ" in capsys.readouterr().out

    def entry(curve, gold, other=False):
        e = {"method": "ppo", "curve": curve, "setting": "final", "kl": 2.0, "gold_score": gold, "gold_score_se": 0.02}
        return {**e, "other_base": True} if other else e

    summary = {"methods": [entry("ppo", 0.6), entry("ppo:other", 0.7, other=True)], "mixed_bases": ["ppo:other"]}
    summary["gold_at_kl"] = compare.gold_at_kl(summary["methods"], [1.0], None)
    for table in (report.methods_markdown(summary), report.frontier_markdown(summary)):
        rows = [line for line in table.splitlines() if line.startswith("| ppo")]
        assert [r.split(" | ")[0] for r in rows] in (["| ppo", "| ppo:other (other base)"],
                                                      ["| ppo:other (other base)", "| ppo"])  # fmt: skip
        assert table.endswith("compare it by its own base.") and "ppo:other: trained on other data" in table
    summary["mixed_bases"] = []
    assert "other base" not in report.methods_markdown(summary) + report.frontier_markdown(summary)


def test_policy_averaging_evaluates_the_mean_update_of_the_ppo_runs_on_this_base_towards_the_reference(
    tmp_path, monkeypatch
):
    from rlhf_lib.compare import average
    from rlhf_lib.compare.common import save_policy

    outputs = tmp_path / "outputs"
    model = toy_task.build_model(tmp_path / "model")
    tokenizer = models.load_tokenizer(str(model))
    base = fake_run(outputs / "base", {"data": "done", "reward_model": "done", "ppo": "done"}, model=str(model))
    toy_task.write_data(base.data_dir, tokenizer)
    runs = [base, fake_run(outputs / "seed1", {"ppo": "done"}), fake_run(outputs / "other", {"ppo": "done"})]
    for name in ("uwo1", "uwo2"):  # two more on this base that optimised the ensemble's uwo combination
        run = fake_run(outputs / name, {"ppo": "done"})
        manifest = json.loads(run.manifest_path.read_text())
        manifest["stages"]["ppo"]["params"]["ensemble_reward"] = "uwo"
        write_json_atomic(run.manifest_path, manifest)
        runs.append(run)
    hashes = {"base": {"data": "d", "reward_model": "a"}, "seed1": {"data": "d", "reward_model": "a"},
              "other": {"data": "d", "reward_model": "b"}, "uwo1": {"data": "d", "reward_model": "a"},
              "uwo2": {"data": "d", "reward_model": "a"}}  # fmt: skip
    monkeypatch.setattr(compare, "base_stage_hashes", lambda run: hashes.get(run.root.name))
    for i, run in enumerate(runs):  # three 'PPO' policies: the reference plus a random update each
        policy = models.load_causal_lm(str(model), tokenizer)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        save_policy(policy, tokenizer, run.policy_dir)
    common = {"run": "cmp", "outputs_dir": str(outputs), "device": "cpu", "dtype": "float32"}
    sections = dict(
        common=common,
        eval={"response_length": 4, "temperature": 1.0, "batch_size": 16},
        best_of_n={"enabled": False},
        dpo={"enabled": False},
        rloo={"enabled": False},
        grpo={"enabled": False},
    )
    cmp = {"ppo_runs": ["seed1", "other", "uwo1", "uwo2"], "max_ppo_checkpoints": 0, "average_etas": [0.5, 1.0]}
    profile = compare.load_profile(write_profile(tmp_path, compare=cmp, **sections), base_run="base")

    def score(seqs):
        return toy_task.target_fraction(seqs, 4)

    def gold(texts):
        return [t.count("k") / 4 for t in texts]

    summary = compare.run_comparison(profile, rm_scorer=score, gold_scorer=gold)
    averaged = {(e["curve"], e["setting"]): e for e in summary["methods"] if e["method"] == "ppo_average"}
    assert sorted(averaged) == [(c, s) for c in ("ppo_average", "ppo_average:uwo") for s in ("eta=0.5", "eta=1")]
    assert averaged["ppo_average", "eta=1"]["members"] == ["base", "seed1"]  # "other" optimised another RM
    assert averaged["ppo_average:uwo", "eta=1"]["members"] == ["uwo1", "uwo2"]  # another reward: not averaged in
    assert [averaged[c, "eta=1"]["reward"] for c in ("ppo_average", "ppo_average:uwo")] == ["model", "uwo"]
    assert averaged["ppo_average", "eta=0.5"]["kl"] is not None
    reference = models.load_causal_lm(str(model), tokenizer).state_dict()
    for members, folder in (([0, 1], "ppo_average"), ([3, 4], "ppo_average/uwo")):
        seeds = [models.load_causal_lm(str(runs[i].policy_dir), tokenizer).state_dict() for i in members]
        for eta in (0.5, 1.0):
            got = models.load_causal_lm(str(outputs / "cmp" / folder / f"eta={eta:g}" / "policy"), tokenizer)
            for name, value in got.state_dict().items():
                want = reference[name] + eta * sum(s[name] - reference[name] for s in seeds) / 2
                assert torch.allclose(value, want, atol=1e-6), (folder, eta, name)

    def no_average(*args, **kwargs):
        raise AssertionError("averaged again")

    with monkeypatch.context() as patch:
        patch.setattr(average, "average_policy", no_average)  # a re-run reads the finished evaluations
        again = compare.run_comparison(profile, rm_scorer=score, gold_scorer=gold)
    assert [e for e in again["methods"] if e["method"] == "ppo_average"] == json.loads(
        json.dumps(list(averaged.values()))
    )
    lone = compare.load_profile(
        write_profile(tmp_path, compare={**cmp, "ppo_runs": ["other", "uwo1"]}, **sections), "base"
    )
    with pytest.raises(ConfigError, match=r"optimised one reward, but it has base \(model\), uwo1 \(uwo\):"):
        compare.run_comparison(lone, rm_scorer=score, gold_scorer=gold)
    soup = {**cmp, "ppo_runs": ["other"], "average_etas": [1.0], "average_across_bases": True}
    profile = compare.load_profile(write_profile(tmp_path, compare=soup, **sections), "base")
    (souped,) = [e for e in compare.run_comparison(profile, rm_scorer=score, gold_scorer=gold)["methods"]
                 if e["method"] == "ppo_average"]  # fmt: skip
    assert souped["members"] == ["base", "other"] and souped["across_bases"] is True


def test_ppo_cost_sums_time_and_generated_tokens_up_to_an_update(tmp_path):
    run = Run(tmp_path)
    run.ppo_dir.mkdir()
    rows = [
        {"update": u, "episode": 8 * u, "time/update": 2.0, "objective/response_length": 10.0 + u} for u in (1, 2, 3)
    ]
    (run.ppo_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert compare.ppo_cost(run, 2) == (4.0, 8 * 11 + 8 * 12)
    assert compare.ppo_cost(run, None) == (6.0, 8 * 11 + 8 * 12 + 8 * 13)


def test_notebook_is_in_step_with_its_generator():
    import importlib.util

    import nbformat

    spec = importlib.util.spec_from_file_location(
        "build_compare_notebook", ROOT / "scripts" / "build_compare_notebook.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stored = nbformat.read(str(ROOT / "notebooks" / "06_compare_methods.ipynb"), as_version=4)
    assert [c.source for c in stored.cells] == [c.source for c in module.build().cells]
    assert "parameters" in stored.cells[1].metadata.get("tags", [])


@pytest.mark.slow
def test_whole_comparison_on_the_toy_task(tmp_path, monkeypatch):
    """Reference, a 'PPO' run, best-of-N (ranked by the reward model and by a second reward) and one beta of DPO /
    RLOO / GRPO through one evaluation path."""
    outputs = tmp_path / "outputs"
    model = toy_task.build_model(tmp_path / "model")
    tokenizer = models.load_tokenizer(str(model))
    base = fake_run(outputs / "base", {"data": "done", "reward_model": "done", "ppo": "done"}, model=str(model))
    toy_task.write_data(base.data_dir, tokenizer)
    shutil.copytree(model, base.policy_dir)  # a 'PPO' final policy: the reference itself
    (base.ppo_dir).mkdir()
    (base.ppo_dir / "metrics.jsonl").write_text(
        json.dumps({"update": 1, "episode": 4, "time/update": 1.5, "objective/response_length": 4.0}) + "\n"
    )
    small = {
        "betas": [0.05],
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "lora_r": 2,
        "lora_alpha": 4,
    }
    path = write_profile(
        tmp_path,
        common={"run": "cmp", "outputs_dir": str(outputs), "device": "cpu", "dtype": "float32"},
        eval={"response_length": 4, "temperature": 1.0, "batch_size": 16},
        best_of_n={"ns": [1, 2, 4], "n_samples": 4, "rewards": ["model", "min"]},
        dpo={"betas": [0.1], "max_steps": 2, "lora_r": 2, "lora_alpha": 4},
        rloo=small,
        grpo=small,
    )
    profile = compare.load_profile(path, base_run="base")

    def score(seqs):
        return toy_task.target_fraction(seqs, 4)

    def gold(texts):
        return [t.count("k") / 4 for t in texts]

    loaded = []

    def other_reward(path, settings, tokenizer=None, reward="model"):  # an ensemble's "min", read from the RM folder
        loaded.append((Path(path), reward))
        return lambda seqs: -np.asarray(score(seqs))  # ranks the pool the other way round

    monkeypatch.setattr(compare.eval_sampling, "reward_model_scorer", other_reward)
    summary = compare.run_comparison(profile, rm_scorer=score, gold_scorer=gold, train_scorer=score)
    assert loaded == [(base.reward_model_dir, "min")]
    keys = {
        "method",
        "setting",
        "kl",
        "kl_analytic",
        "gold_score",
        "gold_score_se",
        "rm_score",
        "win_rate_vs_ref",
        "win_rate_ci",
        "length",
        "eos_fraction",
        "train_seconds",
        "generated_tokens",
    }
    found = {(e["method"], e["setting"]) for e in summary["methods"]}
    assert {
        ("reference", ""),
        ("ppo", "final"),
        ("best_of_n", "N=4"),
        ("best_of_n_oracle", "N=2"),
        ("dpo", "beta=0.1"),
        ("rloo", "beta=0.05"),
        ("grpo", "beta=0.05"),
    } <= found
    for e in summary["methods"]:
        assert keys <= set(e), e["method"]
    by = {(e["method"], e["setting"]): e for e in summary["methods"]}
    ref, ppo = by[("reference", "")], by[("ppo", "final")]
    # the 'PPO' policy is the reference: same seed, same samples, zero KL, all ties
    assert ppo["gold_score"] == ref["gold_score"] and ppo["kl"] == 0.0 and ppo["win_rate_vs_ref"] == 0.5
    assert ppo["train_seconds"] == 1.5 and ppo["generated_tokens"] == 16
    assert by[("rloo", "beta=0.05")]["generated_tokens"] > 0 and by[("dpo", "beta=0.1")]["generated_tokens"] == 0
    assert by[("best_of_n", "N=4")]["kl_analytic"] == pytest.approx(np.log(4) - 0.75)
    assert by[("best_of_n_oracle", "N=4")]["gold_score"] >= by[("best_of_n", "N=1")]["gold_score"]
    by_curve = {(e["curve"], e["setting"]): e for e in summary["methods"]}
    ranked_min, ranked_rm = by_curve[("best_of_n:min", "N=4")], by_curve[("best_of_n", "N=4")]
    assert ranked_min["reward"] == "min" and ranked_rm["reward"] == "model"
    assert ranked_min["rm_score"] <= by_curve[("best_of_n", "N=1")]["rm_score"] <= ranked_rm["rm_score"]
    assert ranked_min["reward_score"] == pytest.approx(-ranked_min["rm_score"])  # ranked by its own reward
    assert [by[(m, s)]["reward"] for m, s in (("ppo", "final"), ("rloo", "beta=0.05"), ("dpo", "beta=0.1"))] == [
        "model",
        "model",
        None,
    ]
    assert set(summary["best_of_n_fit"]) == {"best_of_n", "best_of_n:min", "best_of_n_oracle"}
    written = json.loads((outputs / "cmp" / "frontier.json").read_text())  # the frontier view, beside the summary
    assert [r["name"] for r in written["rewards"]] == ["base:model"]
    assert {(p["method"], p["setting"]) for p in written["points"]} >= {("best_of_n:min", "N=4"), ("rloo", "beta=0.05")}
    assert written["best_of_n_fit"] == json.loads(json.dumps(summary["best_of_n_fit"]))
    assert summary["best_of_n_fit"]["best_of_n"]["n_points"] == 2  # N = 2 and 4 (N = 1 is the reference)
    assert set(summary["gold_at_kl"]) >= {"ppo", "best_of_n", "dpo", "rloo", "grpo"}
    out = outputs / "cmp"
    assert json.loads((out / "summary.json").read_text())["methods"] == json.loads(json.dumps(summary["methods"]))
    assert (out / "dpo" / "beta=0.1" / "policy" / "config.json").exists()
    table = report.samples_table(out / "samples.jsonl", 2)
    assert ("dpo", "beta=0.1") in table.index and table.shape[1] == 2

    # a re-run reuses the trained settings only on the inputs they were trained on
    recorded = json.loads((out / "dpo" / "beta=0.1" / "train.json").read_text())["inputs"]
    assert recorded["data_dir"] == str(base.data_dir.resolve()) and recorded["config"]["max_steps"] == 2
    other = fake_run(outputs / "other", {"data": "done", "reward_model": "done"}, model=str(model))
    toy_task.write_data(other.data_dir, tokenizer)
    with pytest.raises(ConfigError, match=r"dpo/beta=0\.1/train\.json: was trained with data_dir = .*--run"):
        compare.run_comparison(
            compare.load_profile(path, base_run="other"), rm_scorer=score, gold_scorer=gold, train_scorer=score
        )
    report.plot_frontier(summary, out / "plots" / "frontier.png")
    assert (out / "plots" / "frontier.png").stat().st_size > 0
    assert summary["git"]["commit"] and summary["versions"]["torch"] and summary["device"]["type"] == "cpu"
    assert summary["params"]["dpo"]["betas"] == [0.1] and summary["params"]["eval"]["response_length"] == 4

    # restartable: a second run reuses every trained setting and every finished evaluation (nothing is redone) ...
    stamp = (out / "rloo" / "beta=0.05" / "train.json").stat().st_mtime_ns
    evaluated = []
    real_evaluate = compare.evaluate_policy

    def counting(ctx, policy, method, setting, **extra):
        evaluated.append((method, setting))
        return real_evaluate(ctx, policy, method, setting, **extra)

    def no_pool(*args, **kwargs):
        raise AssertionError("best-of-N was sampled again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare, "evaluate_policy", counting)
        mp.setattr(compare.bon, "sample_pool", no_pool)
        again = compare.run_comparison(profile, rm_scorer=score, gold_scorer=gold, train_scorer=score)
        assert evaluated == [] and again["methods"] == json.loads(json.dumps(summary["methods"]))
        assert (out / "rloo" / "beta=0.05" / "train.json").stat().st_mtime_ns == stamp
        # ... except the evaluation of a policy rewritten since: a retrained setting is evaluated afresh
        weights = next((out / "grpo" / "beta=0.05" / "policy").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes())
        os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))
        compare.run_comparison(profile, rm_scorer=score, gold_scorer=gold, train_scorer=score)
        assert evaluated == [("grpo", "beta=0.05")]
    with pytest.raises(ConfigError, match="evals"):  # a corrupt record is not silently reused
        (out / compare.EVALS / "dpo" / "beta=0.1.json").write_text("{ not json")
        compare.run_comparison(profile, rm_scorer=score, gold_scorer=gold, train_scorer=score)
    # the base's reward model redone in place (same folder) after the settings were trained: refused before any work
    manifest = json.loads(base.manifest_path.read_text())
    manifest["stages"]["reward_model"]["ended"] = "2999-01-01T00:00:00+00:00"
    write_json_atomic(base.manifest_path, manifest)
    with pytest.raises(ConfigError, match=r"dpo/beta=0\.1/train\.json: trained before .*reward_model stage was redone"):
        compare.run_comparison(profile, rm_scorer=score, gold_scorer=gold, train_scorer=score)


def test_the_evaluation_key_changes_when_the_base_data_or_reward_model_is_rewritten(tmp_path):
    from types import SimpleNamespace

    from rlhf_lib.evaluate.stage import EvalConfig

    base = fake_run(tmp_path / "base", {"data": "done", "reward_model": "done"})
    for folder, name in ((base.data_dir, "eval_prompts.jsonl"), (base.reward_model_dir, "model.safetensors")):
        folder.mkdir(parents=True)
        (folder / name).write_text("x")
    settings = SimpleNamespace(to_dict=lambda: {"response_length": 4})

    def key(**ev):
        return compare.eval_key(EvalConfig(**ev), base, settings, "gold", len, None)

    first = key()
    assert key() == first and key(threads=7) == first  # the thread count does not change what is evaluated
    assert key(n_eval_prompts=3) != first
    for folder, name in ((base.data_dir, "eval_prompts.jsonl"), (base.reward_model_dir, "model.safetensors")):
        before = key()
        (folder / name).write_text("y")  # same size, new content and time: a stage redone in place
        os.utime(folder / name, ns=(1, 10**18))
        assert key() != before, folder


def test_a_second_writer_of_a_comparison_run_is_refused_before_any_work(tmp_path, capsys):
    """One writer per comparison run: while another process holds the run's lock, run_comparison raises at once."""
    fake_run(tmp_path / "base", {"data": "done", "reward_model": "done"})
    profile = compare.load_profile(
        write_profile(tmp_path, common={"run": "cmp", "outputs_dir": str(tmp_path)}), base_run="base"
    )
    code = (
        "import sys, time; from pathlib import Path; from rlhf_lib.core import runlock; "
        "runlock.acquire(Path(sys.argv[1]), 'compare', what='compare other'); print('held', flush=True); "
        "time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "cmp")], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunBusyError, match=f"pid {holder.pid}"):
            compare.run_comparison(profile)
        assert not (tmp_path / "cmp" / "summary.json").exists() and not (tmp_path / "cmp" / compare.EVALS).exists()
        # the command: one error line naming the holder, exit 2, with the notebook (refused before its kernel starts)
        # or without
        for extra in ([], ["--no-notebook"]):
            capsys.readouterr()
            assert compare.main(["--params", profile.source, "--base-run", "base", *extra]) == 2
            err = capsys.readouterr().err
            assert "Traceback" not in err
            (line,) = err.splitlines()
            assert line.startswith("error: run 'cmp' (") and f"is being written by pid {holder.pid} " in line, line
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------------------------------
# faults end in one line: a failed setting is left out and listed, bad input and a busy run exit 2, interrupts 130/143

RERUN = "; fix the cause and re-run the same command (finished trainings and evaluations are reused)"


def _no_model_comparison(tmp_path: Path, monkeypatch, trained: list[float], fail: dict[float, BaseException]):
    """DPO at betas 0.1 and 0.2 on a fake base run, no model anywhere: the context, DPO training (which raises
    ``fail[beta]`` for the betas in ``fail`` and records the betas it trained in ``trained``) and the evaluation
    are stand-ins. Returns the command's arguments (in-process, no notebook)."""
    from types import SimpleNamespace

    from rlhf_lib.compare.common import TRAIN_FILE, setting_inputs

    fake_run(tmp_path / "base", {"data": "done", "reward_model": "done"})
    path = write_profile(
        tmp_path,
        common={"run": "cmp", "outputs_dir": str(tmp_path), "device": "cpu", "dtype": "float32"},
        best_of_n={"enabled": False},
        dpo={"betas": [0.1, 0.2]},
        rloo={"enabled": False},
        grpo={"enabled": False},
    )
    settings = SimpleNamespace(device="cpu", response_length=4, temperature=1.0, to_dict=lambda: {"n": 4})

    def context(ev, base, rm_scorer=None, gold_scorer=None):
        return SimpleNamespace(
            settings=settings,
            tokenizer=None,
            rows=[],
            ref_samples=SimpleNamespace(texts=[]),
            ref_rm=None,
            ref_gold=None,
            judge="gold",
            eval_cfg=ev,
            key={},
        )

    def entry(method, setting, **extra):
        numbers = dict(kl=0.0, rm_score=0.0, gold_score=0.0, gold_score_se=0.0, win_rate_vs_ref=0.5)
        return {"method": method, "setting": setting, **numbers, **extra}

    def train_dpo(cfg, inputs, beta, folder):
        if beta in fail:
            raise fail[beta]
        trained.append(beta)
        (folder / "policy").mkdir(parents=True)
        (folder / "policy" / "config.json").write_text("{}")
        (folder / TRAIN_FILE).write_text(json.dumps({"train_seconds": 1.0, "inputs": setting_inputs(inputs, cfg)}))

    monkeypatch.setattr(compare, "make_context", context)
    monkeypatch.setattr(
        compare, "entry_from_samples", lambda ctx, s, rm, gold, method, setting, **x: entry(method, setting)
    )
    monkeypatch.setattr(compare.evaluate, "default_policy_loader", lambda *args: lambda folder: folder)
    monkeypatch.setattr(compare, "evaluate_policy", lambda ctx, policy, m, s, **x: (entry(m, s, **x), []))
    monkeypatch.setattr(compare, "train_dpo", train_dpo)
    return ["--params", str(path), "--base-run", "base", "--no-notebook"]


def _stderr_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


def test_a_failed_setting_is_left_out_and_listed_and_a_rerun_trains_only_it(tmp_path, capsys, monkeypatch):
    trained: list[float] = []
    args = _no_model_comparison(tmp_path, monkeypatch, trained, {0.2: RuntimeError("out of memory\nmore detail")})
    out, folder = tmp_path / "cmp", tmp_path / "cmp" / "dpo" / "beta=0.2"
    kept = out / compare.ERRORS / "dpo" / "beta=0.2.txt"
    line = f"RuntimeError: out of memory (traceback in {kept})"
    assert compare.main(args) == 1
    assert trained == [0.1]
    assert _stderr_lines(capsys) == [
        f"error: dpo beta=0.2 ({folder}): {line}",
        f"error: comparison 'cmp' ({out}): 1 method setting failed{RERUN}",
        f"  failed: dpo beta=0.2 ({folder}): {line}",
    ]
    assert "Traceback" in kept.read_text() and "out of memory" in kept.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert [(e["method"], e["setting"]) for e in summary["methods"]] == [("reference", ""), ("dpo", "beta=0.1")]
    assert summary["failed"] == [{"curve": "dpo", "setting": "beta=0.2", "folder": str(folder), "error": line}]

    trained.clear()
    args = _no_model_comparison(tmp_path, monkeypatch, trained, {})
    assert compare.main(args) == 0
    assert trained == [0.2]  # the finished setting is reused, the failed one trained again
    assert _stderr_lines(capsys) == [] and not kept.exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and ("dpo", "beta=0.2") in {(e["method"], e["setting"]) for e in summary["methods"]}


def test_the_summary_records_the_sha256_of_the_base_stages_it_read(tmp_path, capsys, monkeypatch):
    """summary.json's base_stages, as a sweep point's: a base run that built its data and reward model gives their
    content hashes (a rewritten data file another); a run on another base (a sweep point) the hashes its manifest
    recorded for that base."""
    from rlhf_lib.core import runs

    args = _no_model_comparison(tmp_path, monkeypatch, [], {})
    base = Run(tmp_path / "base")
    for folder, name, text in ((base.data_dir, "rm_train.jsonl", '{"a": 1}\n'), (base.reward_model_dir, "x", "{}")):
        folder.mkdir(parents=True)
        (folder / name).write_text(text)
    assert compare.main(args) == 0
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    built = {stage: runs.stage_hash(base, stage) for stage in ("data", "reward_model")}
    assert summary["base_stages"] == built
    (base.data_dir / "rm_train.jsonl").write_text('{"a": 2}\n')
    assert compare.main(args) == 0
    rewritten = json.loads((tmp_path / "cmp" / "summary.json").read_text())["base_stages"]
    assert rewritten["data"] != built["data"] and rewritten["reward_model"] == built["reward_model"]

    args = _no_model_comparison(tmp_path / "on_a_point", monkeypatch, [], {})
    point = fake_run(tmp_path / "on_a_point" / "point", {"ppo": "done", "eval": "done"})
    recorded = {"data": {"ended": "t", "sha256": "d"}, "reward_model": {"ended": "t", "sha256": "rm"}}
    record = {"name": "base", "root": str(tmp_path / "on_a_point" / "base"), "stages": recorded}
    write_json_atomic(point.manifest_path, {**point.manifest(), "base_run": record})
    assert compare.main([*args[:-2], "point", args[-1]]) == 0
    summary = json.loads((tmp_path / "on_a_point" / "cmp" / "summary.json").read_text())
    assert summary["base_run"] == str(point.root) and summary["base_stages"] == {"data": "d", "reward_model": "rm"}


def test_an_interrupted_comparison_is_one_line_naming_the_setting(tmp_path, capsys, monkeypatch):
    import signal

    from rlhf_lib.core import cli

    trained: list[float] = []
    args = _no_model_comparison(tmp_path, monkeypatch, trained, {0.1: cli.Interrupted(signal.SIGTERM)})
    assert compare.main(args) == 143
    assert trained == []  # stopped there: beta 0.2 is not trained
    assert _stderr_lines(capsys) == [
        f"interrupted during comparison 'cmp' ({tmp_path / 'cmp'}) in dpo beta=0.1; re-run the same command to "
        "finish (finished trainings and evaluations are reused)"
    ]
    assert not (tmp_path / "cmp" / "summary.json").exists()


def test_a_comparison_that_fails_outside_any_setting_is_one_line(tmp_path, capsys, monkeypatch):
    args = _no_model_comparison(tmp_path, monkeypatch, [], {})

    def no_reference(*args, **kwargs):
        raise RuntimeError("the reference model could not be loaded")

    monkeypatch.setattr(compare, "make_context", no_reference)
    assert compare.main(args) == 1
    kept = tmp_path / "cmp" / compare.ERRORS / "comparison.txt"
    assert _stderr_lines(capsys) == [
        f"error: comparison failed: RuntimeError: the reference model could not be loaded (traceback in {kept})"
    ]
    assert "no_reference" in kept.read_text()


@pytest.mark.parametrize(
    "ename,status,line",
    [
        (
            "RuntimeError",
            1,
            "error: comparison failed: RuntimeError: boom (executed notebook with the traceback: {nb})",
        ),
        ("ConfigError", 2, "error: boom"),
        (
            "KeyboardInterrupt",
            130,
            "interrupted during comparison 'cmp' ({out}); re-run the same command to finish "
            "(finished trainings and evaluations are reused)",
        ),
    ],
)
def test_a_failed_notebook_cell_is_one_line(tmp_path, capsys, monkeypatch, ename, status, line):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    args = _no_model_comparison(tmp_path, monkeypatch, [], {})

    def failing(*args, **kwargs):
        raise PapermillExecutionError(1, 1, "summary = compare.run_comparison(profile)", ename, "boom\nmore", [])

    monkeypatch.setattr(papermill, "execute_notebook", failing)
    out = tmp_path / "cmp"
    assert compare.main(args[:-1]) == status  # with the notebook
    nb = out / "notebooks" / compare.NOTEBOOK
    assert _stderr_lines(capsys) == [line.format(nb=nb, out=out)]
    assert runlock.held(out) is None  # the run's lock was released


def test_a_curve_variant_takes_its_curve_marker_and_names_the_variant():
    style = report.curve_style
    assert style("ppo_average") == report.STYLE["ppo_average"]
    assert style("ppo_average:uwo") == ("PPO, seeds averaged (per eta), uwo", report.STYLE["ppo_average"][1])
    assert style("best_of_n:min") == ("best-of-N (RM), min", "s")
    assert style("mystery") == ("mystery", "o") and style("mystery:x") == ("mystery:x", "o")
