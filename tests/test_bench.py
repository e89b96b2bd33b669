"""`make bench` (rlhf_lib.bench.cli, bench_configs, bench_report, bench_workers): pure helpers (ratios, steady-state
summary, result parsing, table, JSON keys) and a tiny end-to-end run of our side on tiny:llama, each configuration in
its own subprocess."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from rlhf_lib.bench import cli as bench
from rlhf_lib.bench import configs as bench_configs
from rlhf_lib.bench import report as bench_report
from rlhf_lib.bench import workers as bench_workers
from rlhf_lib.core import config
from rlhf_lib.core.io import repo_root
from rlhf_lib.lm import models


def _row(update, t_update, t_gen=1.0, t_fwd=0.5, t_opt=2.0, tok_s=100.0):
    return {
        "update": update,
        "time/update": t_update,
        "time/generation": t_gen,
        "time/forward": t_fwd,
        "time/optimization": t_opt,
        "tokens_per_s": tok_s,
        "objective/response_length": 10.0,
    }


def _report(configs, trl=None, **workload):
    base = {
        "model": "bundled:smollm2-135m-instruct",
        "batch_size": 8,
        "response_length": 48,
        "num_ppo_epochs": 4,
        "num_mini_batches": 1,
    }
    return {
        "configs": configs,
        "trl": trl,
        "reference_config": bench_configs.REFERENCE_CONFIG,
        "published_trl": bench_configs.PUBLISHED_TRL,
        "workload": {**base, **workload},
    }


def test_ratio_is_ours_over_theirs_and_none_when_missing():
    assert bench_report.ratio(1.2, 0.3) == pytest.approx(4.0)
    assert bench_report.ratio(None, 0.3) is None
    assert bench_report.ratio(1.0, None) is None
    assert bench_report.ratio(1.0, 0.0) is None


def test_summarize_updates_drops_warmup_and_weights_by_time():
    rows = [_row(1, 100.0), _row(2, 4.0, t_gen=1.0, tok_s=200.0), _row(3, 12.0, t_gen=3.0, tok_s=100.0)]
    s = bench_report.summarize_updates(rows, warmup=1, batch_size=8)
    assert s["timed_updates"] == 2
    assert s["episodes_per_s"] == pytest.approx(16 / 16.0)  # total episodes / total seconds, not a mean of rates
    assert s["s_per_update"] == pytest.approx(8.0)
    assert s["generation_s"] == pytest.approx(2.0)
    assert s["tokens_per_s"] == pytest.approx((200 * 1 + 100 * 3) / 4)  # total tokens / total generation time
    with pytest.raises(ValueError, match="no timed updates"):
        bench_report.summarize_updates(rows, warmup=3, batch_size=8)


def test_merge_rounds_pools_timed_updates_and_keeps_each_round():
    ours = [
        {
            "updates": [_row(1, 100.0), _row(2, 4.0, t_gen=1.0, tok_s=200.0)],
            "peak_rss_gib": 2.0,
            "host_probe_before": {"bf16_matmul": {"ms_median": 11.0}},
        },
        {
            "updates": [_row(1, 90.0), _row(2, 12.0, t_gen=3.0, tok_s=100.0)],
            "peak_rss_gib": 2.5,
            "host_probe_before": {"bf16_matmul": {"ms_median": 26.0}},
        },
    ]
    for r in ours:
        r.update(bench_report.summarize_updates(r["updates"], 1, 8))
    merged = bench_report.merge_rounds(ours, warmup=1, batch_size=8)
    assert merged["timed_updates"] == 2 and len(merged["updates"]) == 4  # each round drops its own warm-up
    assert merged["episodes_per_s"] == pytest.approx(16 / 16.0)
    assert merged["tokens_per_s"] == pytest.approx((200 * 1 + 100 * 3) / 4)
    assert merged["peak_rss_gib"] == 2.5
    assert [r["episodes_per_s"] for r in merged["rounds"]] == pytest.approx([2.0, 8 / 12])
    assert [r["host_probe_before"]["bf16_matmul"]["ms_median"] for r in merged["rounds"]] == [11.0, 26.0]  # own probe
    trl_rows = [
        {
            "update": 1,
            "time/update": 9.0,
            "time/generation": 1.0,
            "time/forward": 1.0,
            "time/optimization": 7.0,
            "tokens": 400,
        },
        {
            "update": 2,
            "time/update": 8.0,
            "time/generation": 2.0,
            "time/forward": 1.0,
            "time/optimization": 5.0,
            "tokens": 384,
        },
    ]
    trl = bench_report.merge_rounds([{"updates": trl_rows, "peak_rss_gib": 7.0}] * 2, warmup=1, batch_size=8)
    assert trl["s_per_update"] == pytest.approx(8.0) and trl["tokens_per_s"] == pytest.approx(192.0)
    rm = bench_report.merge_rounds(  # whole trainings: 16 pairs x 2 epochs in 4 s (8 steps), then in 12 s
        [
            {"pairs_per_s": 8.0, "seconds": 4.0, "steps": 8, "s_per_step": 0.5, "peak_rss_gib": 1.0},
            {"pairs_per_s": 32 / 12, "seconds": 12.0, "steps": 8, "s_per_step": 1.5, "peak_rss_gib": 1.5},
        ],
        1,
        8,
    )
    assert rm["pairs_per_s"] == pytest.approx(64 / 16)  # pairs trained over seconds taken, not a mean of rates
    assert rm["s_per_step"] == pytest.approx(16 / 16) and rm["seconds"] == pytest.approx(8.0)  # of one training
    assert rm["peak_rss_gib"] == 1.5 and [r["seconds"] for r in rm["rounds"]] == [4.0, 12.0]
    failed = bench_report.merge_rounds([ours[0], {"error": "exit status 1"}], warmup=1, batch_size=8)
    assert failed["error"] == "exit status 1"
    assert bench_report.merge_rounds(ours[:1], warmup=1, batch_size=8)["episodes_per_s"] == ours[0]["episodes_per_s"]


def test_summarize_probe_reports_fastest_median_and_their_ratio_per_dtype():
    p = bench_report.summarize_probe(
        {"bf16": [10.0, 30.0, 12.0, 25.0, 11.0], "fp32": [8.0, 8.0, 9.0]}, read_gib=0.25, read_s=[0.05, 0.02, 0.04]
    )
    bf16, fp32 = p["bf16_matmul"], p["fp32_matmul"]
    assert bf16["ms_min"] == 10.0 and bf16["ms_median"] == 12.0 and bf16["repeats"] == 5
    assert bf16["slowdown"] == pytest.approx(1.2) and fp32["slowdown"] == pytest.approx(1.0)
    n = bench_configs.PROBE_MATMULS["bf16"][1]
    assert bf16["tflops_best"] == pytest.approx(2 * n**3 / 10e-3 / 1e12, rel=1e-3, abs=5e-4)  # rounded to 3 decimals
    assert p["read_gb_s_best"] == pytest.approx(0.25 * 2**30 / 0.02 / 1e9, rel=1e-3)
    with pytest.raises(ValueError, match="at least one"):
        bench_report.summarize_probe({"bf16": []}, read_gib=0.25, read_s=[0.1])


def test_probe_line_lists_each_run_and_round_in_order():
    def probe(bf16: float, fp32: float) -> dict:
        return {"bf16_matmul": {"ms_median": bf16, "ms_min": 10.0}, "fp32_matmul": {"ms_median": fp32, "ms_min": 8.0}}

    ours = {
        "kind": "ppo",
        "name": "ours",
        "rounds": [{"host_probe_before": probe(11.0, 8.0)}, {"host_probe_before": probe(24.0, 9.5)}],
    }
    trl = {"name": "trl", "host_probe_before": probe(15.0, 8.2)}
    line = bench_report.probe_line({"configs": {"ours": ours, "rm": {"kind": "reward_model"}}, "trl": trl})
    assert line.endswith(
        "ours r1 11.0 (10.0) / 8.0 (8.0); ours r2 24.0 (10.0) / 9.5 (8.0); trl 15.0 (10.0) / 8.2 (8.0)"
    )
    failed = {"kind": "ppo", "name": "x", "host_probe_before": {"error": "exit status 1"}}
    assert bench_report.probe_line({"configs": {"x": failed}, "trl": None}) == ""


def test_ratios_by_round_pair_each_round_of_ours_with_trls():
    report = _report(
        {
            bench_configs.REFERENCE_CONFIG: {
                "episodes_per_s": 1.0,
                "peak_rss_gib": 2.0,
                "rounds": [{"episodes_per_s": 1.2}, {"episodes_per_s": 0.8}],
            }
        },
        trl={"episodes_per_s": 0.25, "peak_rss_gib": 8.0, "rounds": [{"episodes_per_s": 0.3}, {"episodes_per_s": 0.2}]},
    )
    bench_report.add_ratios(report)
    assert report["episodes_per_s_ratio_vs_trl_by_round"] == pytest.approx([4.0, 4.0])
    assert "x4.00, x4.00" in bench_report.format_table(report)


def test_reference_configuration_is_exactly_the_default_profiles_ppo():
    """`make bench`'s reference is what `make pipeline` trains with: every PPOConfig field the default profile gives
    the ppo stage, apart from the workload's (model, batch, lengths, run length) and the run's bookkeeping."""
    spec = bench_configs.BenchSpec()
    profile = config.stage_parameters(config.load_params_file(repo_root() / "params" / "default.yaml"), "ppo")
    workload = {
        "model",
        "reward_model",
        "device",
        "threads",
        "seed",
        "batch_size",
        "total_episodes",
        "response_length",
        "num_ppo_epochs",
        "num_mini_batches",
        "temperature",
        "save_every",
        "sample_every",
        "run",
        "outputs_dir",
        "overwrite",
        "resume",
    }
    reference = dataclasses.asdict(bench_configs.ppo_config(bench_configs.REFERENCE_CONFIG, spec))
    assert {k: v for k, v in reference.items() if k not in workload} == {
        k: v for k, v in profile.items() if k not in workload
    }
    assert reference["torch_compile"] is True and reference["use_lora"] is True and reference["dtype"] == "auto"
    assert reference["total_episodes"] == spec.batch_size * (spec.warmup + spec.updates)
    for name, changes in bench_configs.PPO_CONFIGS.items():  # the others differ from it by exactly what the table says
        other = dataclasses.asdict(bench_configs.ppo_config(name, spec))
        assert {k for k in other if other[k] != reference[k]} == {k for k in changes if changes[k] != reference[k]}
    assert bench_configs.ppo_config("ours-lora-bf16", dataclasses.replace(spec, compile=True)).torch_compile is True


def test_parse_result_prefers_the_marker_line_over_other_json():
    out = "{'eps': 4}\n" + bench_workers.RESULT_MARKER + json.dumps({"a": 1}) + "\nprogress...\n"
    assert bench.parse_result(out) == {"a": 1}
    assert bench.parse_result('log\n{"b": 2}\n') == {"b": 2}  # the TRL driver prints a bare JSON line
    with pytest.raises(ValueError):
        bench.parse_result("no result here\n")


def test_ratios_vs_measured_trl_and_published_figures():
    REF = bench_configs.REFERENCE_CONFIG  # the default profile's PPO configuration
    assert REF in bench_configs.PPO_CONFIGS
    ours = {"name": REF, "kind": "ppo", "episodes_per_s": 1.2, "peak_rss_gib": 3.0}
    rep = bench_report.add_ratios(_report({REF: ours}, trl={"episodes_per_s": 0.3, "peak_rss_gib": 7.5}))
    assert rep["episodes_per_s_ratio_vs_trl"] == pytest.approx(4.0)
    assert rep["peak_rss_ratio_vs_trl"] == pytest.approx(0.4)
    assert rep["episodes_per_s_ratio_vs_published_trl"] == pytest.approx(
        1.2 / bench_configs.PUBLISHED_TRL["episodes_per_s"]
    )
    assert rep["configs"][REF]["episodes_per_s_vs_trl"] == pytest.approx(4.0)
    assert rep["peak_gpu_ratio_vs_trl"] is None  # CPU run: no device memory on either side
    gpu = bench_report.add_ratios(
        _report(
            {REF: dict(ours, peak_gpu_gib=1.5)}, trl={"episodes_per_s": 0.3, "peak_rss_gib": 7.5, "peak_gpu_gib": 6.0}
        )
    )
    assert gpu["peak_gpu_ratio_vs_trl"] == pytest.approx(0.25)
    assert "peak GPU memory x0.25" in bench_report.format_table(gpu)

    no_trl = bench_report.add_ratios(_report({REF: dict(ours)}))
    assert no_trl["episodes_per_s_ratio_vs_trl"] is None and no_trl["peak_rss_ratio_vs_trl"] is None
    assert no_trl["peak_rss_ratio_vs_published_trl"] == pytest.approx(3.0 / bench_configs.PUBLISHED_TRL["peak_rss_gib"])
    failed = bench_report.add_ratios(_report({REF: dict(ours)}, trl={"error": "exit status 1"}))
    assert failed["episodes_per_s_ratio_vs_trl"] is None
    other = bench_report.add_ratios(_report({REF: dict(ours)}, model="tiny:llama"))
    assert other["episodes_per_s_ratio_vs_published_trl"] is None  # published figures describe another workload


def test_format_table_lists_configs_trl_rm_and_labels_published_ratios():
    configs = {
        bench_configs.REFERENCE_CONFIG: {
            "name": bench_configs.REFERENCE_CONFIG,
            "kind": "ppo",
            "episodes_per_s": 1.234,
            "s_per_update": 6.5,
            "generation_s": 2.0,
            "forward_s": 1.0,
            "optimization_s": 3.5,
            "tokens_per_s": 150.0,
            "peak_rss_gib": 2.5,
        },
        "ours-full-fp32": {"name": "ours-full-fp32", "kind": "ppo", "error": "exit status 1"},
        "rm": _rm("rm", "our loop", 3.2, cached=12),
        "rm-trl": _rm("rm-trl", "TRL RewardTrainer", 0.8),
        # an entry of a bench.json written before rm-trl existed: RewardTrainer steps, compiled
        "rm-compile": {"name": "rm-compile", "kind": "reward_model", "pairs_per_s": 2.5, "s_per_step": 3.2},
    }
    table = bench_report.format_table(bench_report.add_ratios(_report(configs)))
    lines = table.splitlines()
    assert lines[0].startswith("| config | ep/s |")
    assert any(ln.startswith(f"| {bench_configs.REFERENCE_CONFIG} | 1.234 | 6.5 |") for ln in lines)
    assert any("ours-full-fp32" in ln and "failed" in ln for ln in lines)
    assert any(ln.startswith("rm (our loop, default profile") and "3.20 pairs/s" in ln for ln in lines)
    assert any(ln.startswith("rm-trl (TRL RewardTrainer, default profile") and "0.80 pairs/s" in ln for ln in lines)
    assert "trunk cached: 12 blocks" in table and "96 pairs x 2.0 epochs" in table
    assert "rm vs rm-trl (the same RewardModelConfig on the same pairs): pairs/s x4.00" in table
    assert any(ln.startswith("rm-compile (RewardTrainer") and "2.50 pairs/s" in ln for ln in lines)
    assert "not measured in this run" in table and "PUBLISHED" in table
    alone = bench_report.add_ratios(_report({"rm": configs["rm"], "rm-trl": {"name": "rm-trl", "error": "exit 1"}}))
    assert alone["rm_pairs_per_s_ratio_vs_trl"] is None and "pairs/s x" not in bench_report.format_table(alone)


def _rm(name, trainer, pairs_per_s, cached=0):
    seconds = 96 * 2 / pairs_per_s
    return {
        "name": name,
        "kind": "reward_model",
        "trainer": trainer,
        "setup": "default profile: LoRA r16 all-linear, top 2 of 14 blocks trained, bfloat16, batch 8, 2 epochs",
        "pairs": 96,
        "num_train_epochs": 2.0,
        "seconds": seconds,
        "steps": 24,
        "s_per_step": seconds / 24,
        "pairs_per_step": 8,
        "pairs_per_s": pairs_per_s,
        "cached_trunk_blocks": cached,
        "mean_sequence_tokens": 150,
        "peak_rss_gib": 1.5,
    }


def _ppo(name, ep_s, s_update, gen, fwd, opt, rss, **extra):
    return {
        "name": name,
        "kind": "ppo",
        "episodes_per_s": ep_s,
        "s_per_update": s_update,
        "generation_s": gen,
        "forward_s": fwd,
        "optimization_s": opt,
        "peak_rss_gib": rss,
        **extra,
    }


def test_plot_bench_draws_phases_memory_target_and_ratio_by_round():
    import matplotlib.pyplot as plt

    from rlhf_lib.bench import plots

    REF = bench_configs.REFERENCE_CONFIG
    ours = _ppo(REF, 1.2, 6.0, 2.0, 1.0, 2.5, 3.0, rounds=[{"episodes_per_s": 1.0}, {"episodes_per_s": 1.4}])
    trl = _ppo(
        bench_configs.TRL_CONFIG_NAME,
        0.3,
        24.0,
        4.0,
        2.0,
        18.0,
        8.0,
        rounds=[{"episodes_per_s": 0.3}, {"episodes_per_s": 0.3}],
    )
    rms = {"rm": _rm("rm", "our loop", 3.2), "rm-compile": {"name": "rm-compile", "kind": "reward_model"}}
    fig = plots.plot_bench(bench_report.add_ratios(_report({REF: ours, **rms}, trl=trl)))
    phases, memory, by_round = fig.axes[:3]

    def segments(row):  # (start, width) of each bar segment of one row, left to right
        return [
            v
            for p in phases.patches
            if round(p.get_y() + p.get_height() / 2) == row
            for v in (p.get_x(), p.get_width())
        ]

    # row 0 = ours, row 1 = TRL; segments generation | forwards | optimisation | other, each starting where the last
    # ended
    assert segments(0) == pytest.approx([0, 2.0, 2.0, 1.0, 3.0, 2.5, 5.5, 0.5])
    assert segments(1) == pytest.approx([0, 4.0, 4.0, 2.0, 6.0, 18.0, 24.0, 0.0])
    labels = [t.get_text() for t in phases.texts]
    assert any("1.200 ep/s (4.00x TRL)" in t for t in labels) and any(t.strip() == "0.300 ep/s" for t in labels)
    assert [p.get_width() for p in memory.patches] == pytest.approx([3.0, 8.0])
    assert memory.lines[0].get_xdata()[0] == pytest.approx(4.0)  # the <= 0.5x TRL target
    rounds_line, pooled, target = by_round.lines
    assert list(rounds_line.get_ydata()) == pytest.approx([1.0 / 0.3, 1.4 / 0.3])
    assert pooled.get_ydata()[0] == pytest.approx(4.0) and target.get_ydata()[0] == pytest.approx(4.0)
    plt.close(fig)

    alone = plots.plot_bench(bench_report.add_ratios(_report({REF: dict(ours)})))  # no TRL: no ratios, no targets
    assert len(alone.axes) == 2 and not alone.axes[1].lines
    assert not any("TRL" in t.get_text() for t in alone.axes[0].texts)
    plt.close(alone)


def test_child_env_sets_threads_and_wait_policy_and_drops_spin_count(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    env = bench.child_env(3, "ACTIVE")
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert "GOMP_SPINCOUNT" not in env  # the policy alone decides, the same for TRL and ours
    assert bench.parse_args([]).omp_wait_policy == bench_configs.BenchSpec.omp_wait_policy == "ACTIVE"


def test_parse_configs_rejects_unknown_names():
    assert bench_configs.parse_configs("ours-lora-bf16, rm") == ["ours-lora-bf16", "rm"]
    with pytest.raises(ValueError, match="choose from"):
        bench_configs.parse_configs("ours-lora-bf16,trl")


def test_synthetic_pairs_have_realistic_length_and_no_pad():
    tok = models.load_tokenizer("tiny:llama")
    rows = bench_workers.synthetic_pairs(tok, n=6, length=150, seed=0)
    lengths = [len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
    assert 130 <= sum(lengths) / len(lengths) <= 170
    for r in rows:
        assert r["chosen_ids"][-1] == tok.eos_token_id
        assert tok.pad_token_id not in r["chosen_ids"] + r["rejected_ids"]


def _profile_reward_model() -> dict:
    """params/default.yaml's reward_model section and common.model, read as plain YAML."""
    import yaml

    params = yaml.safe_load((repo_root() / "params" / "default.yaml").read_text())
    return {"model": params["common"]["model"], **params["reward_model"]}


def test_reward_config_is_the_default_profiles_reward_model_on_the_workload():
    """Both RM configurations train with what `make pipeline`'s reward-model stage trains with: every field the
    default profile sets, apart from the workload's (model, seed, threads, device, pairs per step)."""
    profile = _profile_reward_model()
    spec = bench_configs.BenchSpec(rm_pairs_per_step=6, seed=3, threads=1)
    cfg, changed = bench_configs.reward_config(spec, model_layers=30)  # SmolLM2-135M's blocks: nothing to fit
    assert changed == {}
    used = dataclasses.asdict(cfg)
    workload = {"model": spec.model, "seed": 3, "threads": 1, "device": "auto", "per_device_train_batch_size": 6}
    assert {k: used[k] for k in workload} == workload
    assert {k: used[k] for k in profile if k not in workload} == {k: v for k, v in profile.items() if k not in workload}
    assert cfg.trainable_top_layers == profile["trainable_top_layers"] > 0 and cfg.torch_compile is True
    assert cfg.rm_base == spec.model  # the workload's model is the base, whatever base_model the profile names
    # a model with fewer blocks than the profile keeps keeps all of them; the top blocks trained stay the profile's
    tiny, changed = bench_configs.reward_config(spec, model_layers=2)
    assert changed == {"num_hidden_layers": [profile["num_hidden_layers"], 0]}
    assert tiny.trainable_top_layers == profile["trainable_top_layers"] == 2
    one, changed = bench_configs.reward_config(spec, model_layers=1)  # fewer blocks than the profile trains: all
    assert (one.num_hidden_layers, one.trainable_top_layers) == (0, 0) and changed["trainable_top_layers"] == [2, 0]
    fields = {"num_hidden_layers": 4, "trainable_top_layers": 2, "ensemble": 3}
    assert bench_configs.fit_to_model(fields, 8) == {"ensemble": [3, 1]} and fields["ensemble"] == 1  # one model timed
    compiled = bench_configs.reward_config(dataclasses.replace(spec, compile=True), 30)[0]
    assert compiled.torch_compile is True
    assert {"rm", "rm-trl"} <= set(bench_configs.DEFAULT_CONFIGS) and "rm-compile" not in bench_configs.KNOWN_CONFIGS
    assert all(name in bench_configs.DIFFERENCES for name in bench_configs.RM_CONFIGS)


def test_train_ours_times_the_cached_trunk_and_every_epoch():
    """With fewer trainable top blocks than the model has, the timed training caches the trunk below them (reported)
    and runs every epoch's steps."""
    import torch

    tok = models.load_tokenizer("tiny:llama")
    cfg, _ = bench_configs.reward_config(bench_configs.BenchSpec(model="tiny:llama", rm_pairs_per_step=4), 2)
    cfg = dataclasses.replace(cfg, torch_compile=False, trainable_top_layers=1)
    rows = bench_workers.synthetic_pairs(tok, n=10, length=40, seed=0)
    out = bench_workers.train_ours(cfg, tok, rows, torch.device("cpu"), torch.float32)
    assert out["cached_trunk_blocks"] == 1 and out["blocks"] == 2
    assert out["pairs"] == 10 and out["steps"] == math.ceil(10 / 4) * cfg.num_train_epochs == 6
    assert out["seconds"] > 0


def test_ensemble_scorers_score_each_member_as_its_own_merged_model():
    """The MemberStack rm-ensemble-score times scores every member as that member's own merged model (the single
    path's model for member 0), with the blocks below the adapted one shared."""
    import torch

    from rlhf_lib.reward.scoring import score_sequences

    tok = models.load_tokenizer("tiny:llama")
    cfg, _ = bench_configs.reward_config(bench_configs.BenchSpec(model="tiny:llama"), 2)
    cfg = dataclasses.replace(cfg, torch_compile=False, trainable_top_layers=1)
    merged, stack = bench_workers.ensemble_scorers(cfg, tok, members=3, seed=5, merged=3)
    assert stack.k == 3 and stack.first_block == 1 and len(merged) == 3
    rows = bench_workers.synthetic_pairs(tok, n=5, length=30, seed=0)
    batches = bench_workers.scoring_batches(rows, tok.pad_token_id, batch_pairs=2, device="cpu")
    assert [int(ids.shape[0]) for ids, _ in batches] == [4, 4, 2]
    assert all(int(m[:, 0].min()) == 1 for _, m in batches)  # right padding: every row starts with a real token
    got = torch.cat([stack.member_scores(ids, mask) for ids, mask in batches], dim=1)  # (k, N)
    expected = torch.stack([torch.cat([score_sequences(m, ids, mask) for ids, mask in batches]) for m in merged])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert float((got[0] - got[1]).abs().min()) > 1e-3  # the members differ on every sequence


def test_rm_ensemble_score_worker_times_both_paths_and_reports_the_block_arithmetic():
    import torch

    spec = bench_configs.BenchSpec(
        model="tiny:llama", rm_pairs=6, rm_sequence_length=40, rm_ensemble_members=3, threads=torch.get_num_threads()
    )
    out = bench_workers.run_scoring_config("rm-ensemble-score", spec)
    assert out["kind"] == "reward_scoring" and out["members"] == 3 and out["sequences"] == 12
    blocks, first = out["blocks"], out["first_member_block"]
    assert blocks == bench_workers.model_layers("tiny:llama") == 2 and first == 0  # the profile adapts both blocks
    assert out["expected_block_ratio"] == pytest.approx((first + 3 * (blocks - first)) / blocks) == 3.0
    for which in ("single", "ensemble"):
        repeats = out[f"{which}_s_repeats"]
        assert len(repeats) == bench_workers.SCORING_REPEATS and all(t > 0 for t in repeats)
        assert out[f"{which}_s"] == pytest.approx(sorted(repeats)[len(repeats) // 2])
        assert out[f"sequences_per_s_{which}"] == pytest.approx(12 / out[f"{which}_s"])
    assert (
        out["ensemble_cost_ratio"] == pytest.approx(out["ensemble_s"] / out["single_s"])
        and out["ensemble_cost_ratio"] > 0
    )
    assert out["member0_max_abs_diff"] < 0.02 * out["member_spread"]  # both timed paths score member 0 alike
    for key in ("dtype", "device", "peak_rss_gib", "setup", "changed_for_model"):
        assert key in out, key
    assert out["peak_rss_gib"] > 0 and "3 members" in out["setup"]


def test_rm_ensemble_cost_ratio_is_the_median_of_the_rounds_ratios():
    def scoring(single, ensemble):
        return {
            "name": "rm-ensemble-score",
            "kind": "reward_scoring",
            "setup": "default profile: LoRA r16 all-linear, top 2 of 14 blocks adapted, 4 members",
            "members": 4,
            "sequences": 192,
            "mean_sequence_tokens": 150,
            "single_s_repeats": single,
            "ensemble_s_repeats": ensemble,
            "single_s": sorted(single)[1],
            "ensemble_s": sorted(ensemble)[1],
            "ensemble_cost_ratio": sorted(ensemble)[1] / sorted(single)[1],
            "expected_block_ratio": 20 / 14,
            "peak_rss_gib": 1.0 + len(single) * 0.1 * (ensemble[0] > 3),
        }

    rounds = [scoring([2.0, 2.0, 2.2], [3.0, 3.0, 3.1]), scoring([1.0, 1.1, 1.0], [1.2, 1.2, 1.3])]
    rounds.append(scoring([4.0, 4.0, 4.0], [5.6, 5.6, 5.6]))  # ratios 1.5, 1.2, 1.4
    merged = bench_report.merge_rounds(rounds, warmup=2, batch_size=8)
    assert merged["ensemble_cost_ratio"] == pytest.approx(1.4)  # the rounds' own ratios, not pooled seconds'
    assert len(merged["single_s_repeats"]) == 9 and merged["single_s"] == pytest.approx(2.0)
    assert merged["sequences_per_s_ensemble"] == pytest.approx(192 / 3.0)
    assert [r["ensemble_cost_ratio"] for r in merged["rounds"]] == pytest.approx([1.5, 1.2, 1.4])
    report = bench_report.add_ratios(_report({"rm-ensemble-score": merged}))
    assert report["rm_ensemble_cost_ratio"] == pytest.approx(1.4)
    table = bench_report.format_table(report)
    assert any(ln.startswith("rm-ensemble-score (default profile") and "cost x1.40" in ln for ln in table.splitlines())
    assert "(block forwards x1.43)" in table
    assert "rm_ensemble_cost_ratio" not in bench_report.add_ratios(_report({}))  # only when the config ran
    failed = bench_report.add_ratios(_report({"rm-ensemble-score": {"kind": "reward_scoring", "error": "exit 1"}}))
    assert failed["rm_ensemble_cost_ratio"] is None and "rm-ensemble-score (" in bench_report.format_table(failed)
    assert bench_configs.parse_configs("rm-ensemble-score") == ["rm-ensemble-score"]
    assert "rm-ensemble-score" in bench_configs.DIFFERENCES and "rm-ensemble-score" not in bench_configs.DEFAULT_CONFIGS
    assert bench.parse_args(["--rm-ensemble-members", "3"]).rm_ensemble_members == 3
    assert bench_configs.BenchSpec().rm_ensemble_members == 4


@pytest.mark.slow
def test_rm_and_rm_trl_train_the_profiles_reward_model_on_the_same_pairs(tmp_path, capsys, monkeypatch):
    """`rm` (our loop) and `rm-trl` (RewardTrainer), each in its own worker process: the default profile's settings,
    the identical pairs, whole trainings timed, and their pairs/s ratio in bench.json and the table."""
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")  # eager in the workers: compiling would dominate this test
    argv = ["--model", "tiny:llama", "--configs", "rm,rm-trl", "--rm-pairs", "16", "--rm-pairs-per-step", "4"]
    bench.main([*argv, "--warmup", "1", "--threads", "1", "--probe-repeats", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    ours, trl = saved["configs"]["rm"], saved["configs"]["rm-trl"]
    assert "error" not in ours and "error" not in trl, (ours.get("error"), trl.get("error"))
    for key in ("pairs", "pairs_digest", "mean_sequence_tokens", "steps", "warmup_pairs", "reward_model_config"):
        assert ours[key] == trl[key], key  # the same pairs, the same RewardModelConfig, as many steps
    assert ours["pairs"] == 16 and ours["warmup_pairs"] == 4 and ours["steps"] == 16 // 4 * 2
    profile, used = _profile_reward_model(), ours["reward_model_config"]
    changed = ours["changed_for_model"]  # tiny:llama has 2 blocks, fewer than the profile keeps
    assert changed == {"num_hidden_layers": [profile["num_hidden_layers"], 0]}
    for key, value in profile.items():
        expected = {"model": "tiny:llama", "per_device_train_batch_size": 4}.get(key, value)
        assert (changed[key][0] if key in changed else used[key]) == expected, key
    assert ours["trainable_top_layers"] == profile["trainable_top_layers"] and used["torch_compile"] is True
    assert ours["num_train_epochs"] == profile["num_train_epochs"]
    assert "top 2 of 2 blocks trained" in ours["setup"] and ours["setup"].endswith("eager") and not ours["compile"]
    assert ours["cached_trunk_blocks"] == trl["cached_trunk_blocks"] == 0  # every block of tiny:llama trains
    for r in (ours, trl):
        assert r["kind"] == "reward_model" and r["seconds"] > 0 and r["peak_rss_gib"] > 0
        assert r["pairs_per_s"] == pytest.approx(r["pairs"] * r["num_train_epochs"] / r["seconds"])
        assert r["s_per_step"] == pytest.approx(r["seconds"] / r["steps"])
    assert saved["rm_pairs_per_s_ratio_vs_trl"] == pytest.approx(ours["pairs_per_s"] / trl["pairs_per_s"])
    out = capsys.readouterr().out
    assert "\nrm (our loop, default profile" in out and "\nrm-trl (TRL RewardTrainer, default profile" in out
    assert f"pairs/s x{saved['rm_pairs_per_s_ratio_vs_trl']:.2f}" in out


@pytest.mark.slow
def test_tiny_end_to_end_writes_json_with_every_key(tmp_path, capsys):
    report = bench.main(
        [
            "--model",
            "tiny:llama",
            "--configs",
            "ours-lora-bf16",
            "--updates",
            "1",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--response-length",
            "6",
            "--out",
            str(tmp_path),
            "--omp-wait-policy",
            "PASSIVE",
            "--probe-repeats",
            "3",
        ]
    )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["configs"].keys() == report["configs"].keys() == {"ours-lora-bf16"}
    ours = saved["configs"]["ours-lora-bf16"]
    assert "error" not in ours, ours.get("error")
    for key in (
        "episodes_per_s",
        "s_per_update",
        "generation_s",
        "forward_s",
        "optimization_s",
        "tokens_per_s",
        "peak_rss_gib",
        "child_peak_rss_gib",
        "load_average_before",
        "child_cpu_sys_s",
        "child_minor_page_faults",
    ):
        values = ours[key] if isinstance(ours[key], list) else [ours[key]]  # the load average is three numbers
        assert values and all(v is not None and math.isfinite(v) for v in values), key
    assert ours["timed_updates"] == 1 and len(ours["updates"]) == 2
    assert ours["child_cpu_user_s"] > 0 and ours["child_minor_page_faults"] > 0  # the worker's own rusage
    assert ours["peak_rss_gib"] == pytest.approx(ours["child_peak_rss_gib"], rel=0.05)  # per-process peak
    assert ours["dtype"] == "bfloat16" and ours["use_lora"] is True
    probe = ours["host_probe_before"]  # measured in its own subprocess just before this configuration ran
    assert "error" not in probe, probe
    for dtype in bench_configs.PROBE_MATMULS:
        assert 0 < probe[f"{dtype}_matmul"]["ms_min"] <= probe[f"{dtype}_matmul"]["ms_median"]
        assert probe[f"{dtype}_matmul"]["repeats"] == 3
    assert probe["read_gb_s_best"] > 0
    for key in ("episodes_per_s_ratio_vs_trl", "peak_rss_ratio_vs_trl"):
        assert key in saved and saved[key] is None  # TRL not run
    assert saved["device"]["type"] in ("cpu", "cuda") and saved["threads"] == 1
    assert saved["omp_wait_policy"] == saved["workload"]["omp_wait_policy"] == "PASSIVE"
    assert "differences" in saved and "load_average_start" in saved
    out = capsys.readouterr().out
    assert "| ours-lora-bf16 |" in out
    png = tmp_path / "bench.png"  # the table as a figure, written beside bench.json
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out


# ----------------------------------------------------------------------------------------------------------------
# the seed shape (rlhf_lib.bench.shapes) and the GPU section of bench.json


def test_seed_shape_spec_matches_the_seed_profile_and_flags_override_it():
    import yaml

    from rlhf_lib.bench import shapes as bench_shapes

    profile = yaml.safe_load(open(repo_root() / "params" / "seed_gpt2_ultrafeedback.yaml"))["ppo"]
    spec = bench_configs.spec_for_shape("seed", model=None, batch_size=None, updates=1)
    for key in ("batch_size", "num_mini_batches", "response_length", "temperature"):
        assert getattr(spec, key) == profile[key], key
    assert spec.num_ppo_epochs == bench_configs.BenchSpec.num_ppo_epochs == 4  # the profile keeps PPOConfig's default
    assert spec.shape == "seed" and spec.updates == 1 and spec.model == bench_shapes.SEED_MODEL_REF
    assert bench_configs.spec_for_shape("seed", model="tiny:gpt2").model == "tiny:gpt2"  # the CPU dry run's model
    default = bench_configs.spec_for_shape("default")
    assert (default.batch_size, default.num_mini_batches, default.shape) == (8, 1, "default")
    with pytest.raises(ValueError, match="choose from default, seed"):
        bench_configs.spec_for_shape("colab")
    # the seed profile fine-tunes fully (use_lora: false): so does the seed shape's reference configuration
    ref = bench_shapes.reference_config("seed", bench_configs.REFERENCE_CONFIG)
    assert (
        profile["use_lora"] is False
        and bench_configs.PPO_CONFIGS[ref]["use_lora"] is False
        and ref in bench_configs.DIFFERENCES
    )
    assert bench_shapes.reference_config("default", bench_configs.REFERENCE_CONFIG) == bench_configs.REFERENCE_CONFIG
    assert bench_configs.shape_configs("seed")[0] == ref and set(bench_configs.shape_configs("seed")) <= set(
        bench_configs.KNOWN_CONFIGS
    )
    assert bench.parse_args(["--shape", "seed"]).configs is None  # the shape's own list then


def _gpu_report(shape, ours_gpu, trl_gpu, ours_eps=3.0, trl_eps=1.0, device_name="NVIDIA H200"):
    from rlhf_lib.bench import shapes as bench_shapes

    ref = bench_shapes.reference_config(shape, bench_configs.REFERENCE_CONFIG)
    ours = _ppo(ref, ours_eps, 64 / ours_eps, 0.2, 0.3, 0.5, 2.0, peak_gpu_gib=ours_gpu)
    other = {"name": "ours-full-fp32", "kind": "ppo", "error": "exit status -9"}
    trl = _ppo(bench_configs.TRL_CONFIG_NAME, trl_eps, 64 / trl_eps, 1.0, 0.5, 2.0, 3.0, peak_gpu_gib=trl_gpu)
    report = _report({ref: ours, "ours-full-fp32": other}, trl=trl, shape=shape, batch_size=64)
    report.update(reference_config=ref, device={"type": "cuda", "name": device_name})
    return bench_report.add_ratios(report)


def test_gpu_section_has_the_keys_per_configuration_and_the_seed_targets():
    from rlhf_lib.bench import shapes as bench_shapes

    report = _gpu_report("seed", ours_gpu=3.0, trl_gpu=8.0, ours_eps=3.3, trl_eps=1.0)
    gpu = bench_shapes.gpu_section(report)
    ref = bench_shapes.SEED_REFERENCE_CONFIG
    assert gpu["device_name"] == "NVIDIA H200" and gpu["shape"] == "seed" and gpu["reference_config"] == ref
    assert set(gpu["configs"]) == {ref, "ours-full-fp32", bench_configs.TRL_CONFIG_NAME}
    ours = gpu["configs"][ref]
    assert ours["episodes_per_s"] == 3.3 and ours["peak_gpu_gib"] == 3.0
    assert ours["seconds_per_update"] == pytest.approx(
        {"total": 64 / 3.3, "generation": 0.2, "forward": 0.3, "optimization": 0.5}
    )
    assert gpu["configs"]["ours-full-fp32"] == {"error": "exit status -9"}  # a killed configuration stays visible
    assert gpu["episodes_per_s_ratio_vs_trl"] == pytest.approx(3.3)
    assert gpu["peak_gpu_ratio_vs_trl"] == pytest.approx(3.0 / 8.0)
    assert gpu["targets"] == {"episodes_per_s_ratio_vs_trl": 3.0, "peak_gpu_ratio_vs_trl": 0.5}
    assert gpu["meets_targets"] is True
    assert bench_shapes.gpu_section(_gpu_report("seed", 5.0, 8.0, 3.3))["meets_targets"] is False  # 0.625x memory
    assert bench_shapes.gpu_section(_gpu_report("seed", 3.0, 8.0, 2.9))["meets_targets"] is False  # 2.9x speed
    cpu = _gpu_report("seed", None, None, device_name=None)  # a CPU dry run: no device memory on either side
    cpu_gpu = bench_shapes.gpu_section(cpu)
    assert cpu_gpu["device_name"] is None and cpu_gpu["peak_gpu_ratio_vs_trl"] is None
    assert cpu_gpu["meets_targets"] is None  # undecided, not failed
    default = bench_shapes.gpu_section(_gpu_report("default", 1.0, 4.0))
    assert default["reference_config"] == bench_configs.REFERENCE_CONFIG and "targets" not in default
