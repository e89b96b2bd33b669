"""Sweeps and shared upstream stages: base-run sharing and its refusals, sweep files and point commands, the
aggregation (mean / Student-t CI) and the Gao et al. frontier fit, then tiny-model sweeps end to end (papermill)."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlhf_lib import pipeline
from rlhf_lib.core import runs
from rlhf_lib.core.config import CommonConfig, ConfigError
from rlhf_lib.sweeps import plots as sweeps_plots
from rlhf_lib.sweeps import runner as experiments
from rlhf_lib.sweeps import stats as sweep_stats
from rlhf_lib.sweeps.runner import Sweep, SweepError

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SWEEP = ROOT / "params" / "sweeps" / "smoke.yaml"


# ----------------------------------------------------------------------------------------------------------------
# shared upstream stages


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root: (mtime_ns, bytes), to show a folder was not written."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _base(outputs: str, name: str = "base", finish_rm: bool = True) -> runs.Run:
    cfg = CommonConfig(run=name, outputs_dir=outputs)
    run = runs.start_stage(cfg, "data")
    run.data_dir.mkdir(parents=True, exist_ok=True)
    (run.data_dir / "ppo_prompts.jsonl").write_text('{"id": "a"}\n')
    runs.finish_stage(run, "data", {"n": 1})
    runs.start_stage(cfg, "reward_model")
    run.reward_model_dir.mkdir(parents=True, exist_ok=True)
    (run.reward_model_dir / "model.safetensors").write_bytes(b"weights")
    if finish_rm:
        runs.finish_stage(run, "reward_model", {"acc": 0.5})
    return run


def test_base_run_missing_or_unfinished_is_refused_naming_which(outputs):
    with pytest.raises(runs.StageError, match=r"base run 'nope' \(common.base_run\) does not exist"):
        runs.start_stage(CommonConfig(run="p", outputs_dir=outputs, base_run="nope"), "ppo")
    base = _base(outputs, finish_rm=False)
    with pytest.raises(runs.StageError, match=r"stage 'reward_model' of base run 'base'.*running there, not done"):
        runs.start_stage(CommonConfig(run="p", outputs_dir=outputs, base_run="base"), "ppo")
    with pytest.raises(runs.StageError, match="must be a run name"):
        runs.start_stage(CommonConfig(run="p", outputs_dir=outputs, base_run="a/b"), "ppo")
    assert not (Path(outputs) / "p").exists()  # nothing was created for a refused stage
    assert base.stage_status("reward_model") == "running"


def test_a_run_on_a_base_never_runs_or_writes_the_shared_stages(outputs, tmp_path, monkeypatch):
    base = _base(outputs)
    before = _files(base.root)
    cfg = CommonConfig(run="p", outputs_dir=outputs, base_run="base")
    for stage in ("data", "reward_model"):
        with pytest.raises(runs.StageError, match=f"reads stage '{stage}' from base run 'base'"):
            runs.start_stage(cfg, stage)
    calls = []
    real_hash = runs.stage_hash
    monkeypatch.setattr(runs, "stage_hash", lambda run, stage: calls.append(stage) or real_hash(run, stage))
    run = runs.start_stage(cfg, "ppo")
    record = run.manifest()["base_run"]
    assert record["name"] == "base" and Path(record["root"]) == base.root.resolve()
    assert {s: v["sha256"] for s, v in record["stages"].items()} == {
        "data": real_hash(base, "data"),
        "reward_model": real_hash(base, "reward_model"),
    }
    # later stages read the base's outputs through one function; the run's own stages stay its own
    assert run.upstream("data").data_dir == base.root.resolve() / "data"
    assert runs.stage_source(run, "reward_model").reward_model_dir == base.root.resolve() / "reward_model"
    assert run.upstream("ppo") is run and run.upstream("eval") is run
    runs.finish_stage(run, "ppo", {})
    runs.start_stage(cfg, "eval")  # the base's stages are hashed once, not again per stage
    assert sorted(calls) == ["data", "reward_model"]
    assert _files(base.root) == before  # not a byte nor an mtime of the base changed
    with pytest.raises(runs.StageError, match="already reads data \\+ reward_model from base run 'base'"):
        runs.start_stage(CommonConfig(run="p", outputs_dir=outputs), "eval")


def test_base_redone_after_use_is_refused_and_pipeline_plans_refuse_shared_stages(outputs, tmp_path):
    _base(outputs)
    cfg = CommonConfig(run="p", outputs_dir=outputs, base_run="base")
    runs.finish_stage(runs.start_stage(cfg, "ppo"), "ppo", {})
    time.sleep(1.1)  # stage end times have one-second resolution
    _base_cfg = CommonConfig(run="base", outputs_dir=outputs, overwrite=True)
    runs.finish_stage(runs.start_stage(_base_cfg, "reward_model"), "reward_model", {})
    with pytest.raises(runs.StageError, match="was redone after run 'p' used it"):
        runs.start_stage(cfg, "eval")
    profile = tmp_path / "p.yaml"
    params = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    params["common"].update(outputs_dir=outputs, base_run="base")
    profile.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="--stages ppo,eval"):
        pipeline.plan(str(profile), "q", ["data", "reward_model", "ppo", "eval"], [], False, False)
    assert [s for s, _ in pipeline.plan(str(profile), "q", ["ppo", "eval"], [], False, False)] == ["ppo", "eval"]


# ----------------------------------------------------------------------------------------------------------------
# sweep files and point commands


def _sweep_file(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(SMOKE_SWEEP.read_text())
    raw.update(changes)
    path = tmp_path / f"{raw.get('name', 'smoke')}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"grdi": {}}, "unknown keys \\['grdi'\\]"),
        ({"grid": {"ppo.kl_coeff": [0.1]}}, "unknown key 'kl_coeff'"),
        ({"grid": {"ppo.kl_coef": ["high"]}}, "key 'kl_coef' must be float"),
        ({"grid": {"common.outputs_dir": ["/x"]}}, "set by the sweep for each point"),
        ({"grid": {"data.n_rm_prompts": [8, 16]}}, "varies a stage read from the base run"),
        ({"stages": ["data", "ppo"]}, "include a stage read from the base run"),
        ({"grid": {"common.seed": []}}, "non-empty list"),
        ({"headline": "yes"}, "headline is 'yes'; write headline: true or headline: false"),
    ],
)
def test_sweep_file_errors_name_the_key(tmp_path, changes, match):
    with pytest.raises((SweepError, ConfigError), match=match):
        experiments.load_sweep(_sweep_file(tmp_path, **changes), str(tmp_path / "out"))


def test_printed_commands_are_pipeline_runs_of_each_point(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands run from the repo root
    out = tmp_path / "out"
    sweep = experiments.load_sweep(SMOKE_SWEEP, str(out))
    assert experiments.main([str(SMOKE_SWEEP), "--outputs-dir", str(out), "--print-commands"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python -m rlhf_lib.pipeline")]
    points = sweep.points()
    assert len(lines) == len(points) == 5 and points[0].is_base
    seen = set()
    for line, point in zip(lines, points):
        args = shlex.split(line)[3:]
        assert "--skip-done" in args and "--overwrite" not in args  # never redoes a finished stage
        args.remove("--skip-done")
        pairs = list(zip(args[::2], args[1::2]))
        opts = {k: v for k, v in pairs if k != "-p"}
        overrides = [v for k, v in pairs if k == "-p"]
        todo = pipeline.plan(opts["--params"], opts["--run"], opts["--stages"].split(","), overrides, False, True)
        params = dict(todo[-1][1])
        assert params["outputs_dir"] == str(out.resolve() / "smoke") and params["run"] == point.name
        if point.is_base:
            assert [s for s, _ in todo] == ["data", "reward_model"] and params["base_run"] == ""
        else:
            assert [s for s, _ in todo] == ["ppo", "eval"] and params["base_run"] == "base"
            ppo_params = dict(todo)["ppo"]
            seen.add((ppo_params["seed"], ppo_params["kl_coef"]))
            assert (ppo_params["seed"], ppo_params["kl_coef"]) == (
                point.overrides["common.seed"],
                point.overrides["ppo.kl_coef"],
            )
    assert seen == {(0, 0.05), (0, 0.5), (1, 0.05), (1, 0.5)}
    assert experiments.main([str(SMOKE_SWEEP), "--outputs-dir", str(out), "--point", "9"]) == 2
    # --threads sets where the points run (common.threads), nothing they compute
    assert experiments.main([str(SMOKE_SWEEP), "--outputs-dir", str(out), "--print-commands", "--threads", "1"]) == 0
    threaded = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python -m")]
    assert threaded == [f"{line} -p common.threads=1" for line in lines]
    assert experiments.main([str(SMOKE_SWEEP), "--outputs-dir", str(out), "--threads", "0"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# aggregation and the frontier fit


def _fake_point(root: Path, name: str, summary: dict, done: bool = True) -> None:
    (root / name).mkdir(parents=True)
    status = "done" if done else "running"
    manifest = {"stages": {"ppo": {"status": "done"}, "eval": {"status": status}}}
    (root / name / "manifest.json").write_text(json.dumps(manifest))
    (root / name / "summary.json").write_text(json.dumps(summary))


def _eval_summary(gold_after: float, gold_before: float = 0.1, kl: float = 2.0) -> dict:
    curve = [
        {"label": "reference", "step": 0.0, "kl": 0.0, "rm_score": 0.0, "gold_score": gold_before},
        {"label": "final", "step": 4.0, "kl": kl, "rm_score": 1.0, "gold_score": gold_after},
    ]
    return {
        "ppo": {"final_kl": kl, "train_seconds": 3.0},
        "eval": {
            "before": {"gold_score": gold_before, "rm_score": 0.0, "kl": 0.0},
            "after": {"gold_score": gold_after, "rm_score": 1.0, "kl": kl},
            "win_rate_vs_ref": 0.5,
            "win_rate_ci": [0.4, 0.6],
            "win_rate_judge": "gold",
            "overoptimisation": curve,
        },
    }


def test_aggregation_mean_std_and_t_interval_match_a_hand_computation(tmp_path):
    sweep = Sweep(
        "s",
        "params/smoke.yaml",
        tmp_path / "s",
        base_run="",
        stages=("ppo", "eval"),
        grid={"common.seed": [0, 1, 2, 3], "ppo.kl_coef": [0.1, 0.2]},
    )
    gold = {0.1: [1.0, 2.0, 4.0], 0.2: [0.5, 0.5, 2.0]}
    for point in sweep.grid_points():
        seed, coef = point.overrides["common.seed"], point.overrides["ppo.kl_coef"]
        if seed == 3:  # a killed point: left out of its group
            _fake_point(sweep.root, point.name, {"ppo": {"final_kl": 99.0}}, done=False)
        else:
            _fake_point(sweep.root, point.name, _eval_summary(gold[coef][seed]))
    summary = experiments.aggregate(sweep)
    written = json.loads((sweep.root / "summary.json").read_text())
    assert set(written) >= {"points", "groups", "frontier_fit", "wall_seconds"}
    assert [p["status"] for p in written["points"]].count("done") == 6
    group = next(g for g in written["groups"] if g["overrides"] == {"ppo.kl_coef": 0.1})
    assert group["n_seeds"] == 3 and group["points"] == ["seed0-kl_coef0.1", "seed1-kl_coef0.1", "seed2-kl_coef0.1"]
    m = group["metrics"]["eval.after.gold_score"]
    mean = 7 / 3
    std = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)  # Student t quantile t(0.975, 2), from a t table
    assert m["mean"] == pytest.approx(mean) and m["std"] == pytest.approx(std) and m["n"] == 3
    assert (m["ci95_low"], m["ci95_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    new = 4.302652729911275 * std * math.sqrt(1 + 1 / 3)  # one new seed: the mean's spread plus a draw's own
    assert (m["pi95_low"], m["pi95_high"]) == (pytest.approx(mean - new), pytest.approx(mean + new))
    assert group["prediction_interval"]["eval.after.gold_score"] == [
        pytest.approx(mean - new),
        pytest.approx(mean + new),
    ]
    assert written["headline"] is False  # only a sweep file that says headline: true is the README's source
    assert group["metrics"]["derived.gold_gain"]["mean"] == pytest.approx(mean - 0.1)
    assert group["metrics"]["ppo.final_kl"]["mean"] == 2.0  # the killed point's 99 is not in it
    assert group["metrics"]["eval.win_rate_ci.1"]["std"] == pytest.approx(0.0)
    assert "eval.win_rate_judge" not in group["metrics"]  # numeric keys only
    other = next(g for g in summary["groups"] if g["overrides"] == {"ppo.kl_coef": 0.2})
    assert other["metrics"]["eval.after.gold_score"]["mean"] == pytest.approx(1.0)
    gains = sorted(r["gold_gain"] for r in written["frontier"])
    assert gains == pytest.approx(sorted(g - 0.1 for v in gold.values() for g in v))


def test_selection_takes_the_best_gold_within_the_kl_budget_only_among_cells_with_every_seed(tmp_path):
    sweep = Sweep(
        "s",
        "params/smoke.yaml",
        tmp_path / "s",
        base_run="",
        stages=("ppo", "eval"),
        grid={"common.seed": [0, 1], "ppo.kl_coef": [0.05, 0.1, 0.2]},
    )
    # 0.05: best gold but over the KL budget; 0.1: one lucky seed only; 0.2: both seeds, within budget
    cells = {0.05: ([0.9, 0.9], 7.0), 0.1: ([0.95, None], 3.0), 0.2: ([0.6, 0.7], 2.0)}
    for point in sweep.grid_points():
        seed, coef = point.overrides["common.seed"], point.overrides["ppo.kl_coef"]
        gold, kl = cells[coef][0][seed], cells[coef][1]
        if gold is None:
            _fake_point(sweep.root, point.name, {"ppo": {}}, done=False)
        else:
            _fake_point(sweep.root, point.name, _eval_summary(gold, kl=kl))
    summary = experiments.aggregate(sweep)
    assert summary["complete"] is False and summary["selection"] is None  # chosen only from a finished grid
    chosen = sweep_stats.select_default(summary["groups"], min_seeds=2)
    assert chosen["overrides"] == {"ppo.kl_coef": 0.2} and chosen["n_seeds"] == 2
    assert chosen["eval.after.gold_score"]["mean"] == pytest.approx(0.65)
    assert sweep_stats.select_default(summary["groups"], min_seeds=1)["overrides"] == {"ppo.kl_coef": 0.1}
    assert sweep_stats.select_default(summary["groups"], kl_budget=1.0, min_seeds=2) is None


def test_headline_table_reports_reference_policy_and_paired_gain_as_mean_and_t_half_width(tmp_path):
    sweep = Sweep("s", "params/smoke.yaml", tmp_path / "s", base_run="", grid={"common.seed": [0, 1, 2]})
    for point, gold in zip(sweep.grid_points(), (0.5, 0.6, 0.7)):
        _fake_point(sweep.root, point.name, _eval_summary(gold, gold_before=0.2))
    table = sweep_stats.headline_markdown(experiments.aggregate(sweep, write=False), {})
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n), std of (0.5, 0.6, 0.7) = 0.1
    row = next(line for line in table.splitlines() if line.startswith("| gold score"))
    new = 4.302652729911275 * 0.1 * math.sqrt(1 + 1 / 3)  # where a fourth seed's gain falls
    pi = f"[{0.4 - new:.3f}, {0.4 + new:.3f}] |"
    assert row.split(" | ")[1:] == ["0.200 ± 0.000", f"0.600 ± {half:.3f}", f"0.400 ± {half:.3f}", pi]
    assert table.splitlines()[0].startswith("| the default profile; 3 seeds, mean ± 95 % CI |")
    assert table.splitlines()[0].endswith("| gain of one new run (95 % PI) |")
    kl_row = next(line for line in table.splitlines() if line.startswith("| KL"))
    assert kl_row.endswith("|  |  |")  # no gain, so no prediction interval
    cells = sweep_stats.cells_markdown(experiments.aggregate(sweep, write=False)).splitlines()
    assert cells[0].startswith("| seeds | gold | gold gain |") and cells[2].startswith(f"| 3 | 0.600 ± {half:.3f} |")
    with pytest.raises(KeyError, match="no cell"):
        sweep_stats.headline_markdown(experiments.aggregate(sweep, write=False), {"ppo.kl_coef": 9})


def test_paired_comparison_of_two_sweeps_differences_by_seed_over_the_seeds_both_finished(tmp_path):
    a = Sweep("a", "params/smoke.yaml", tmp_path / "a", base_run="", grid={"common.seed": [0, 1, 2]})
    b = Sweep("b", "params/smoke.yaml", tmp_path / "b", base_run="", grid={"common.seed": [0, 1, 2, 3]})
    gold_a, gold_b = {0: 0.5, 1: 0.9, 2: 0.4}, {0: 0.6, 1: 0.8, 2: 0.7, 3: 5.0}  # seed 3 has no partner in a
    for sweep, gold in ((a, gold_a), (b, gold_b)):
        for point in sweep.grid_points():
            _fake_point(sweep.root, point.name, _eval_summary(gold[point.overrides["common.seed"]]))
    sa, sb = experiments.aggregate(a, write=False), experiments.aggregate(b, write=False)
    diff = sweep_stats.paired_difference(sa, {}, sb, {}, "eval.after.gold_score")
    naive = [gold_b[s] - gold_a[s] for s in (0, 1, 2)]  # 0.1, -0.1, 0.3: paired, unlike the difference of means
    assert diff["seeds"] == [0, 1, 2] and diff["n"] == 3
    assert diff["mean"] == pytest.approx(sum(naive) / 3) and diff["std"] == pytest.approx(0.2)
    assert diff["ci95_high"] - diff["mean"] == pytest.approx(4.302652729911275 * 0.2 / math.sqrt(3))
    table = sweep_stats.paired_markdown(sa, {}, sb, {}, ("without", "with")).splitlines()
    assert table[0].startswith("| mean ± 95 % CI; paired over seeds 0, 1, 2 | without | with | difference |")
    gold_row = next(line for line in table if line.startswith("| gold |"))
    assert gold_row.split(" | ")[3] == f"0.100 ± {4.302652729911275 * 0.2 / math.sqrt(3):.3f} |"


def _ran(sweep: Sweep, point: experiments.Point, gold: float, **edits) -> None:
    """A finished point of ``sweep`` whose manifest records the stage parameters the sweep gives it (plus edits)."""
    params = experiments.point_params(sweep, point)
    stages = {s: {"status": "done", "params": {**params[s], **edits}} for s in point.stages}
    (sweep.root / point.name).mkdir(parents=True)
    (sweep.root / point.name / "manifest.json").write_text(json.dumps({"stages": stages}))
    (sweep.root / point.name / "summary.json").write_text(json.dumps(_eval_summary(gold)))


def test_a_sweep_reuses_identical_finished_points_of_another_sweep_and_never_writes_them(tmp_path):
    # "penalty" ran the profile's beta (0.05, params/smoke.yaml leaves the default) with a penalty over 3 seeds;
    # "beta" varies beta with the same penalty, so its beta = 0.05 points are penalty's, under other names
    penalty = Sweep(
        "penalty",
        "params/smoke.yaml",
        tmp_path / "penalty",
        base_run="",
        grid={"common.seed": [0, 1, 2], "ppo.missing_eos_penalty": [1.0]},
    )
    beta = Sweep(
        "beta",
        "params/smoke.yaml",
        tmp_path / "beta",
        base_run="",
        overrides={"ppo.missing_eos_penalty": 1.0},
        grid={"common.seed": [0, 1, 2], "ppo.kl_coef": [0.05, 0.2]},
        reuse=("penalty",),
    )
    seed0, seed1, seed2 = penalty.grid_points()
    _ran(penalty, seed0, 0.7)
    _ran(penalty, seed1, 0.8, learning_rate=0.123)  # ran with another learning rate: not the same point
    (penalty.root / "timings").mkdir()
    (penalty.root / "timings" / f"{seed0.name}.json").write_text('{"seconds": 42.0}')
    _ran(penalty, seed2, 0.9)
    manifest = json.loads((penalty.root / seed2.name / "manifest.json").read_text())
    manifest["stages"]["eval"]["status"] = "running"  # killed mid-eval: not finished, not reused
    (penalty.root / seed2.name / "manifest.json").write_text(json.dumps(manifest))
    before = _files(penalty.root)

    points = {p.name: p for p in beta.grid_points()}
    assert experiments.point_run(beta, points["seed0-kl_coef0.05"]).root == penalty.root / seed0.name
    assert experiments.point_status(beta, points["seed0-kl_coef0.05"]) == "done"
    for name in ("seed1-kl_coef0.05", "seed2-kl_coef0.05", "seed0-kl_coef0.2"):
        assert experiments.point_run(beta, points[name]).root == beta.root / name
        assert experiments.point_status(beta, points[name]) == "pending"
    assert experiments.run_point(beta, points["seed0-kl_coef0.05"]) is None  # done elsewhere: nothing runs
    _ran(beta, points["seed2-kl_coef0.05"], 0.5)  # its own run, made after the reused one was killed
    summary = experiments.aggregate(beta)
    entry = {e["name"]: e for e in summary["points"]}
    assert entry["seed0-kl_coef0.05"]["run_dir"] == str(penalty.root / seed0.name)
    assert entry["seed0-kl_coef0.05"]["wall_seconds"] == 42.0  # timed in the sweep that ran it
    assert entry["seed2-kl_coef0.05"]["run_dir"] == str(beta.root / "seed2-kl_coef0.05")
    (group,) = [g for g in summary["groups"] if g["overrides"] == {"ppo.kl_coef": 0.05}]
    assert group["n_seeds"] == 2 and group["metrics"]["eval.after.gold_score"]["mean"] == pytest.approx(0.6)
    assert _files(penalty.root) == before
    # an own folder, even unfinished, is the point's: a killed own run is redone, not swapped for another sweep's
    (beta.root / "seed0-kl_coef0.05").mkdir()
    (beta.root / "seed0-kl_coef0.05" / "manifest.json").write_text('{"stages": {}}')
    assert experiments.point_run(beta, points["seed0-kl_coef0.05"]).root == beta.root / "seed0-kl_coef0.05"
    assert experiments.point_status(beta, points["seed0-kl_coef0.05"]) == "ppo pending"


def test_merge_takes_finished_points_without_a_folder_here_from_an_earlier_summary_of_the_same_sweep(tmp_path):
    # the sweep ran seeds 0-1 elsewhere (their folders are gone, their summary.json kept); seed 2 runs here
    grid = {"common.seed": [0, 1, 2], "ppo.kl_coef": [0.1]}
    elsewhere = Sweep("s", "params/smoke.yaml", tmp_path / "elsewhere" / "s", base_run="", grid=grid)
    for point, gold in zip(elsewhere.grid_points(), (1.0, 2.0, 9.0)):
        _fake_point(elsewhere.root, point.name, _eval_summary(gold), done=point.overrides["common.seed"] < 2)
    experiments.aggregate(elsewhere)
    earlier = tmp_path / "earlier.json"
    (elsewhere.root / "summary.json").rename(earlier)

    sweep = Sweep("s", "params/smoke.yaml", tmp_path / "here" / "s", base_run="", grid=grid)
    seed0, seed1, seed2 = sweep.grid_points()
    _fake_point(sweep.root, seed2.name, _eval_summary(6.0))
    _fake_point(sweep.root, seed1.name, _eval_summary(0.5), done=False)  # own folder, unfinished: it wins
    summary = experiments.aggregate(sweep, merge=[earlier])
    entry = {e["name"]: e for e in summary["points"]}
    assert entry[seed0.name]["merged_from"] == str(earlier) and entry[seed0.name]["status"] == "done"
    assert entry[seed0.name]["run_dir"] == str(elsewhere.root / seed0.name)  # where it ran, as recorded
    assert entry[seed1.name]["status"] == "eval running" and "merged_from" not in entry[seed1.name]
    assert "merged_from" not in entry[seed2.name]
    (group,) = summary["groups"]
    assert group["n_seeds"] == 2 and group["metrics"]["eval.after.gold_score"]["mean"] == pytest.approx(3.5)
    assert summary["merged_from"] == [str(earlier)]
    table = sweep_stats.points_table(summary)  # the sweep notebook's table says which points were merged
    assert list(table["status"]) == ["done (merged)", "eval running", "done"]

    other = Sweep("s", "params/smoke.yaml", tmp_path / "o" / "s", base_run="", overrides={"ppo.kl_coef": 0.3})
    with pytest.raises(SweepError, match=r"--merge .*earlier.json: its overrides is \{\} but sweep 's' has"):
        experiments.aggregate(other, write=False, merge=[earlier])
    (tmp_path / "bad.json").write_text('{"sweep": "s"}')
    with pytest.raises(SweepError, match="bad.json: not a sweep summary.json"):
        experiments.aggregate(sweep, write=False, merge=[tmp_path / "bad.json"])
    with pytest.raises(SweepError, match="gone.json: no such file"):
        experiments.aggregate(sweep, write=False, merge=[tmp_path / "gone.json"])


def test_make_sweep_with_merge_runs_only_the_points_no_summary_has_finished(tmp_path, capsys, monkeypatch):
    path = _sweep_file(tmp_path, name="m", base_run="", stages=["ppo", "eval"], grid={"common.seed": [0, 1, 2]})
    sweep = experiments.load_sweep(path, str(tmp_path / "out"))
    elsewhere = Sweep("m", sweep.params, tmp_path / "elsewhere" / "m", base_run="", grid=sweep.grid)
    for point in elsewhere.grid_points()[:2]:
        _fake_point(elsewhere.root, point.name, _eval_summary(1.0))
    experiments.aggregate(elsewhere)
    ran = []
    monkeypatch.setattr(experiments, "run_point", lambda sweep, point, kernel_name="python3": ran.append(point.name))
    args = [str(path), "--outputs-dir", str(tmp_path / "out"), "--no-notebook"]
    assert experiments.main([*args, "--merge", str(elsewhere.root / "summary.json")]) == 0
    assert ran == ["seed2"]
    assert "seed0: done in a merged summary, skipped" in capsys.readouterr().out
    written = json.loads((sweep.root / "summary.json").read_text())
    assert [bool(e.get("merged_from")) for e in written["points"]] == [True, True, False]
    assert experiments.main([*args, "--point", "1", "--merge", str(elsewhere.root / "summary.json")]) == 0
    assert ran == ["seed2"]  # a merged point given by index is not run either
    # a built base is run here even when a merged summary has it: the points run here read its files
    path = _sweep_file(tmp_path, name="b", grid={"common.seed": [0]})
    sweep = experiments.load_sweep(path, str(tmp_path / "out"))
    elsewhere = Sweep("b", sweep.params, tmp_path / "elsewhere" / "b", grid=sweep.grid)
    for point in elsewhere.points():
        _fake_point(elsewhere.root, point.name, _eval_summary(1.0))
    base = {"stages": {"data": {"status": "done"}, "reward_model": {"status": "done"}}}
    (elsewhere.root / "base" / "manifest.json").write_text(json.dumps(base))
    assert experiments.aggregate(elsewhere)["base"]["status"] == "done"
    args = [str(path), "--outputs-dir", str(tmp_path / "out"), "--merge", str(elsewhere.root / "summary.json")]
    assert experiments.main([*args, "--no-notebook"]) == 0
    assert ran == ["seed2", "base"]


@pytest.mark.parametrize("reuse", [["beta"], ["a/b"], [""], [3]])
def test_reuse_names_other_sweeps_beside_this_one(tmp_path, reuse):
    with pytest.raises(SweepError, match="reuse .*names of other sweeps"):
        experiments.load_sweep(_sweep_file(tmp_path, name="beta", reuse=reuse), str(tmp_path / "out"))


def test_seed_table_lists_each_finished_seed_then_the_mean_and_t_half_width(tmp_path):
    sweep = Sweep("rm", "params/smoke.yaml", tmp_path / "rm", base_run="", grid={"common.seed": [0, 1, 2, 3]})
    for seed, acc in enumerate((0.70, 0.74, 0.78, 0.1)):
        rm = {"reward_model": {"eval_accuracy_vs_gold": acc}, "data": {"label_gold_agreement": 0.75}}
        _fake_point(sweep.root, f"seed{seed}", rm, done=seed < 3)  # seed 3 was killed: neither row nor mean
    table = sweep_stats.seeds_markdown(experiments.aggregate(sweep, write=False)).splitlines()
    assert [row.split(" | ")[1] for row in table[2:]] == ["0.700", "0.740", "0.780", "0.740 ± 0.099"]
    assert table[5].startswith("| mean ± 95 % CI (3 seeds) |") and " | – | " in table[2]  # a missing key: –
    with_pi = sweep_stats.seeds_markdown(experiments.aggregate(sweep, write=False), prediction=True).splitlines()
    new = 4.302652729911275 * 0.04 * math.sqrt(1 + 1 / 3)  # t(0.975, 2) * std * sqrt(1 + 1/n), std 0.04
    assert with_pi[6].split(" | ")[:2] == ["| one new seed, 95 % PI", f"[{0.74 - new:.3f}, {0.74 + new:.3f}]"]


def test_single_seed_has_no_interval_and_json_has_no_nan(tmp_path):
    sweep = Sweep("s", "params/smoke.yaml", tmp_path / "s", base_run="", grid={"common.seed": [0]})
    _fake_point(sweep.root, "seed0", {"eval": {"x": float("nan"), "y": 1.5}})
    experiments.aggregate(sweep)
    text = (sweep.root / "summary.json").read_text()
    assert "NaN" not in text
    (group,) = json.loads(text)["groups"]
    assert group["metrics"]["eval.y"] == {"mean": 1.5, "std": None, "ci95_low": None, "ci95_high": None,
                                            "pi95_low": None, "pi95_high": None, "n": 1}  # fmt: skip
    assert group["prediction_interval"]["eval.y"] is None  # one seed says nothing about where the next falls
    assert group["metrics"]["eval.x"]["n"] == 0


@pytest.mark.parametrize("alpha,beta", [(0.30, 0.08), (1.2, 0.5)])
def test_frontier_fit_recovers_gao_coefficients(alpha, beta):
    rng = np.random.default_rng(0)
    kl = rng.uniform(0.05, 40.0, size=60)
    gain = sweep_stats.gao_gold(kl, alpha, beta)
    exact = sweep_stats.fit_frontier(kl, gain)
    assert exact["alpha"] == pytest.approx(alpha, rel=1e-9) and exact["beta"] == pytest.approx(beta, rel=1e-9)
    d_star = math.exp(alpha / beta - 1)
    assert exact["kl_at_peak"] == pytest.approx(d_star**2) and exact["gold_at_peak"] == pytest.approx(beta * d_star)
    # the peak is where the formula is largest
    grid = np.linspace(0.01, 4 * d_star**2, 20000)
    assert grid[np.argmax(sweep_stats.gao_gold(grid, alpha, beta))] == pytest.approx(d_star**2, rel=1e-2)
    noisy = sweep_stats.fit_frontier(kl, gain + rng.normal(0, 0.01, size=kl.size))
    assert noisy["alpha"] == pytest.approx(alpha, abs=0.02) and noisy["beta"] == pytest.approx(beta, abs=0.01)


def test_frontier_fit_without_a_peak_or_points():
    kl = np.linspace(0.5, 5, 10)
    rising = sweep_stats.fit_frontier(kl, np.sqrt(kl) * 0.2)  # gain = 0.2 d: beta = 0, no bend
    assert rising["beta"] == pytest.approx(0.0, abs=1e-9) and rising["kl_at_peak"] is None
    slight = sweep_stats.fit_frontier(kl, sweep_stats.gao_gold(kl, 0.08, 0.005))  # peak at KL ~ 1e12
    assert slight["beta"] == pytest.approx(0.005) and slight["kl_at_peak"] is None and "beyond" in slight["peak_note"]
    faint = sweep_stats.fit_frontier(kl, sweep_stats.gao_gold(kl, 0.2, 1e-12))  # peak at d = e^(2e11): past any float
    assert faint["beta"] > 0 and faint["kl_at_peak"] is None and "beyond" in faint["peak_note"]
    empty = sweep_stats.fit_frontier([0.0, -0.1], [0.0, 0.1])  # KL <= 0 points carry no shape
    assert empty["alpha"] is None and empty["n_points"] == 0


# ----------------------------------------------------------------------------------------------------------------
# tiny-model sweeps end to end (papermill)

TIMING = ("seconds", "_per_s")


def _numbers(summary: dict) -> dict[str, float]:
    return {k: v for k, v in sweep_stats.numeric_leaves(summary).items() if not any(t in k for t in TIMING)}


def _group_numbers(group: dict) -> dict[str, float]:
    return {
        f"{k}.{stat}": v
        for k, m in group["metrics"].items()
        if not any(t in k for t in TIMING)
        for stat, v in m.items()
        if v is not None
    }


def test_a_cell_whose_points_read_different_bases_is_marked(tmp_path, capsys):
    sweep = Sweep(
        "s",
        "params/smoke.yaml",
        tmp_path / "s",
        base_run="",
        stages=("ppo", "eval"),
        grid={"common.seed": [0, 1], "ppo.kl_coef": [0.1, 0.2]},
    )
    for point in sweep.grid_points():
        _fake_point(sweep.root, point.name, _eval_summary(1.0))
        rm = "rm-b" if point.overrides == {"common.seed": 1, "ppo.kl_coef": 0.2} else "rm-a"  # one rebuilt base
        record = {"name": "base", "root": "/b", "stages": {"data": {"sha256": "d"}, "reward_model": {"sha256": rm}}}
        manifest = sweep.root / point.name / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "base_run": record}))
    summary = experiments.aggregate(sweep)
    marks = {g["overrides"]["ppo.kl_coef"]: (g["bases"], g["mixed_bases"]) for g in summary["groups"]}
    assert marks == {0.1: (1, False), 0.2: (2, True)}
    assert "cell {'ppo.kl_coef': 0.2} mixes 2 bases" in capsys.readouterr().out
    assert summary["points"][0]["base_stages"] == {"data": "d", "reward_model": "rm-a"}


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps")
    assert experiments.main([str(SMOKE_SWEEP), "--outputs-dir", str(out)]) == 0
    return out / "smoke"


@pytest.mark.slow
def test_smoke_sweep_end_to_end_through_papermill(smoke_sweep, capsys):
    summary = json.loads((smoke_sweep / "summary.json").read_text())
    assert len(summary["points"]) == 4 and all(p["status"] == "done" for p in summary["points"])
    assert sorted(g["n_seeds"] for g in summary["groups"]) == [2, 2]
    base = runs.Run(smoke_sweep / "base")
    assert base.stage_status("ppo") is None  # the base holds only the shared stages
    for entry in summary["points"]:
        run = runs.Run(Path(entry["run_dir"]))
        assert not run.data_dir.exists() and not run.reward_model_dir.exists()  # read from the base, not copied
        record = run.manifest()["base_run"]
        assert Path(record["root"]) == base.root.resolve()
        assert {s: v["sha256"] for s, v in record["stages"].items()} == {
            s: runs.stage_hash(base, s) for s in ("data", "reward_model")
        }
        assert entry["summary"]["eval"]["n_eval_prompts"] > 0
        assert entry["base_stages"] == {s: runs.stage_hash(base, s) for s in ("data", "reward_model")}
    assert summary["base"]["base_stages"] == summary["points"][0]["base_stages"]  # the built base hashes its own
    assert all(g["bases"] == 1 and not g["mixed_bases"] for g in summary["groups"])
    for group in summary["groups"]:  # a group's mean is the mean of its points' values
        members = [p for p in summary["points"] if p["name"] in group["points"]]
        kl = [p["summary"]["eval"]["after"]["kl"] for p in members]
        assert group["metrics"]["eval.after.kl"]["mean"] == pytest.approx(float(np.mean(kl)))
    # the fit reads exactly the frontier's points with a positive measured KL (on the tiny smoke model the sign of a
    # KL near 0 is sampling noise, so how many there are is not asserted; fit_frontier's own tests hold its maths)
    positive = [f for f in summary["frontier"] if f["kl"] is not None and f["kl"] > 0 and f["gold_gain"] is not None]
    assert summary["frontier"] and summary["frontier_fit"]["n_points"] == len(positive)
    nb = json.loads((smoke_sweep / "notebooks" / experiments.NOTEBOOK).read_text())
    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    assert (smoke_sweep / "plots" / "sweep_frontier.png").exists()
    # a second run skips every finished point and writes nothing into them
    before = {p: _files(smoke_sweep / p) for p in ("base", *[e["name"] for e in summary["points"]])}
    capsys.readouterr()
    assert experiments.main([str(SMOKE_SWEEP), "--outputs-dir", str(smoke_sweep.parent), "--no-notebook"]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 5
    assert {p: _files(smoke_sweep / p) for p in before} == before


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.slow
def test_a_killed_point_is_redone_and_the_summary_equals_an_uninterrupted_sweep(smoke_sweep, tmp_path):
    base = smoke_sweep / "base"
    base_files = _files(base)
    sweep_file = _sweep_file(tmp_path, name="killed", base_run=str(base))
    out = tmp_path / "out"
    sweep = experiments.load_sweep(sweep_file, str(out))
    first, victim = sweep.points()[0], sweep.points()[1]
    cmd = [sys.executable, "-m", "rlhf_lib.sweeps", str(sweep_file), "--outputs-dir", str(out), "--no-notebook"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while experiments.point_run(sweep, victim).stage_status("ppo") != "running":
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before the point could be killed"
        time.sleep(0.05)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the sweep and its notebook kernel, as a scheduler would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert experiments.point_status(sweep, victim) == "ppo running"  # killed mid-stage
    finished = _files(experiments.point_run(sweep, first).root)
    assert experiments.main([str(sweep_file), "--outputs-dir", str(out), "--no-notebook"]) == 0
    assert _files(experiments.point_run(sweep, first).root) == finished  # a finished point is never rewritten
    assert _files(base) == base_files  # the shared base is never written
    killed = json.loads((out / "killed" / "summary.json").read_text())
    clean = json.loads((smoke_sweep / "summary.json").read_text())
    assert [p["name"] for p in killed["points"]] == [p["name"] for p in clean["points"]]
    for a, b in zip(killed["points"], clean["points"]):
        assert a["status"] == "done" and _numbers(a["summary"]) == pytest.approx(_numbers(b["summary"]))
    for a, b in zip(killed["groups"], clean["groups"]):
        assert a["overrides"] == b["overrides"] and a["n_seeds"] == b["n_seeds"] == 2
        assert _group_numbers(a) == pytest.approx(_group_numbers(b)) and _group_numbers(a)
    assert killed["frontier_fit"]["alpha"] == pytest.approx(clean["frontier_fit"]["alpha"])


def test_sweep_notebook_is_thin_literal_parameters_and_built_by_its_script():
    import ast

    import nbformat

    sys.path.insert(0, str(ROOT / "scripts"))
    import build_sweep_notebook

    nb = nbformat.read(ROOT / "notebooks" / experiments.NOTEBOOK, as_version=4)
    assert [c.source for c in nb.cells] == [c.source for c in build_sweep_notebook.build().cells]  # not stale
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    names = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(params.source).body}
    assert names == {"sweep": "smoke", "outputs_dir": ""}
    for cell in nb.cells:
        assert not cell.get("outputs") and "def " not in cell.source and "class " not in cell.source


@pytest.mark.parametrize("path", sorted((ROOT / "params" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_validates_every_point(path, tmp_path):
    sweep = experiments.load_sweep(path, outputs_dir=str(tmp_path))  # raises naming the point and key on a bad value
    points = sweep.grid_points()
    assert points and len({p.name for p in points}) == len(points)
    seeds = {p.overrides.get(sweep.seed_key) for p in points}
    assert len(seeds) >= 3 or path.stem == "smoke", f"{path.name}: fewer than 3 seeds, so no interval over seeds"


def test_frontier_table_error_bars_are_the_tables_95_percent_t_interval():
    gains = [0.1, 0.3, 0.8]
    frontier = [
        {"cell": {"ppo.kl_coef": 0.1}, "label": "final", "step": 4.0, "kl": 1.0 + s, "gold_gain": g, "rm_gain": g}
        for s, g in enumerate(gains)
    ]
    row = sweeps_plots.frontier_table({"frontier": frontier}).iloc[0]
    std = float(np.std(gains, ddof=1))
    assert row["gold_gain_ci95"] == pytest.approx(4.302652729911275 * std / math.sqrt(3))  # t(0.975, 2)
    assert row["kl_ci95"] == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))  # KL 1, 2, 3: sd 1
    single = sweeps_plots.frontier_table({"frontier": frontier[:1]}).iloc[0]
    assert single["n_seeds"] == 1 and math.isnan(single["gold_gain_ci95"])  # one seed: no interval
