"""The figures of `make bench` from raw results, and how they are shown: steady-state figures from per-update rows,
the host probe's summary, rounds merged, the ratios against TRL (measured and published) and of ensemble scoring
against one member, the Markdown table and the host-probe line. Pure and tested; the figure is
:func:`rlhf_lib.bench.plots.plot_bench`.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from rlhf_lib.bench.configs import (
    PROBE_MATMULS,
    PUBLISHED_WORKLOAD,
    RM_ENSEMBLE_SCORE_CONFIG,
    RM_REFERENCE_CONFIG,
    RM_TRL_CONFIG,
    TRL_CONFIG_NAME,
)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None when either is missing or theirs is not positive."""
    if ours is None or theirs is None or not theirs > 0:
        return None
    return ours / theirs


def summarize_updates(rows: Sequence[dict[str, Any]], warmup: int, batch_size: int) -> dict[str, Any]:
    """Steady-state figures from per-update metric rows (time/* keys): warm-up rows dropped, means of the rest."""
    timed = list(rows[warmup:])
    if not timed:
        raise ValueError(f"no timed updates: {len(rows)} rows with warmup={warmup}")
    n = len(timed)
    seconds = sum(r["time/update"] for r in timed)
    gen = sum(r["time/generation"] for r in timed)
    tokens = sum(
        r["tokens"] if "tokens" in r else r["tokens_per_s"] * r["time/generation"]  # rate x time
        for r in timed
    )
    return {
        "timed_updates": n,
        "episodes_per_s": batch_size * n / seconds,
        "s_per_update": seconds / n,
        "generation_s": gen / n,
        "forward_s": sum(r["time/forward"] for r in timed) / n,
        "optimization_s": sum(r["time/optimization"] for r in timed) / n,
        "tokens_per_s": tokens / gen if gen > 0 else None,
        "response_length": sum(r.get("objective/response_length", 0.0) for r in timed) / n,
    }


def summarize_probe(matmul_ms: dict[str, Sequence[float]], read_gib: float, read_s: Sequence[float]) -> dict[str, Any]:
    """The host probe's figures from its raw timings: matmuls per dtype (sizes: PROBE_MATMULS), a read of `read_gib`
    GiB.

    The medians are the figures to compare between runs: the same work, so a higher median means a host more
    contended for its cores, caches, memory bus and matrix units -- which a shared host's load average, counting only
    this machine's processes, does not show. ``slowdown`` = median / fastest within the probe: how much it varied
    over its few seconds. Both dtypes are timed because our runs are bf16 (AMX) and TRL's fp32, and a busy spell need
    not slow them alike.
    """
    if not read_s or not matmul_ms or not all(matmul_ms.values()):
        raise ValueError("the host probe needs at least one timing of each matmul and of the read")
    out: dict[str, Any] = {}
    for dtype, times in matmul_ms.items():
        n, ordered = PROBE_MATMULS[dtype][1], sorted(times)
        best, median = ordered[0], ordered[len(ordered) // 2]
        out[f"{dtype}_matmul"] = {
            "n": n,
            "repeats": len(ordered),
            "ms_min": round(best, 3),
            "ms_median": round(median, 3),
            "tflops_best": round(2 * n**3 / best / 1e9, 3),
            "slowdown": round(median / best, 3),
        }
    out["read_gb_s_best"] = round(read_gib * 2**30 / min(read_s) / 1e9, 2)
    return out


def merge_rounds(results: Sequence[dict[str, Any]], warmup: int, batch_size: int) -> dict[str, Any]:
    """One configuration measured in several rounds -> one result over all their timed updates (RM: trainings).

    The figures are recomputed from every round's timed updates pooled (each round drops its own warm-up; RM: every
    round's timed training pooled), the peak RSS is the largest; ``rounds`` keeps each round's own episodes/s (RM:
    pairs/s), s/update (RM: s/step and seconds) and RSS; ensemble scoring: :func:`merge_scoring_rounds`. A failed
    round makes the merged result that failure.
    """
    if len(results) == 1:
        return dict(results[0])
    failed = [r for r in results if "error" in r]
    if failed:
        return {**failed[0], "rounds": [{"error": r["error"]} if "error" in r else {} for r in results]}
    if results[-1].get("kind") == "reward_scoring":
        return merge_scoring_rounds(results)
    merged = dict(results[-1])
    if "updates" in merged:  # PPO, ours or TRL
        rows = [row for r in results for row in r["updates"][warmup:]]
        merged.update(summarize_updates(rows, 0, batch_size))
        merged["updates"] = [row for r in results for row in r["updates"]]
        keys = ("episodes_per_s", "s_per_update", "peak_rss_gib", "host_probe_before")
    else:  # reward model: the rounds' whole trainings pooled (pairs x epochs trained over seconds taken)
        seconds = sum(r["seconds"] for r in results)
        trained = sum(r["pairs_per_s"] * r["seconds"] for r in results)
        merged.update(
            seconds=seconds / len(results),  # of one training, as each round's
            s_per_step=seconds / sum(r["steps"] for r in results),
            pairs_per_s=trained / seconds,
        )
        keys = ("pairs_per_s", "s_per_step", "seconds", "peak_rss_gib", "host_probe_before")
    merged["peak_rss_gib"] = max(r["peak_rss_gib"] for r in results)
    merged["rounds"] = [{k: r.get(k) for k in keys} for r in results]
    return merged


SCORING_ROUND_KEYS = ("ensemble_cost_ratio", "single_s", "ensemble_s", "peak_rss_gib", "host_probe_before")


def merge_scoring_rounds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Ensemble scoring measured in several rounds -> one result: every round's timed passes pooled (medians of the
    pooled lists, rates from them), the cost ratio the median of the rounds' own ratios (each taken between passes
    that alternated in one process, so a slow spell of the host falls on both), the largest peak RSS."""
    merged = dict(results[-1])
    for which in ("single", "ensemble"):
        merged[f"{which}_s_repeats"] = [t for r in results for t in r[f"{which}_s_repeats"]]
        merged[f"{which}_s"] = statistics.median(merged[f"{which}_s_repeats"])
        merged[f"sequences_per_s_{which}"] = merged["sequences"] / merged[f"{which}_s"]
    merged["ensemble_cost_ratio"] = statistics.median(r["ensemble_cost_ratio"] for r in results)
    merged["member0_max_abs_diff"] = max(r.get("member0_max_abs_diff", 0.0) for r in results)
    merged["peak_rss_gib"] = max(r["peak_rss_gib"] for r in results)
    merged["rounds"] = [{k: r.get(k) for k in SCORING_ROUND_KEYS} for r in results]
    return merged


def ensemble_cost_ratio(result: dict[str, Any] | None) -> float | None:
    """The ensemble's scoring seconds over one member's, pooled over rounds (median of the rounds' ratios); None when
    the configuration did not run or failed."""
    if not result or "error" in result:
        return None
    rounds = [r for r in result.get("rounds") or [] if r.get("ensemble_cost_ratio") is not None]
    return statistics.median(r["ensemble_cost_ratio"] for r in rounds) if rounds else result.get("ensemble_cost_ratio")


def add_ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Fill the ratio keys: vs TRL measured in this run (None when not run) and vs TRL's published figures."""
    ref = report["configs"].get(report["reference_config"]) or {}
    trl = report.get("trl") or {}
    trl_ok = bool(trl) and "error" not in trl
    report["episodes_per_s_ratio_vs_trl"] = (
        ratio(ref.get("episodes_per_s"), trl.get("episodes_per_s")) if trl_ok else None
    )
    report["peak_rss_ratio_vs_trl"] = ratio(ref.get("peak_rss_gib"), trl.get("peak_rss_gib")) if trl_ok else None
    # on a GPU the memory that binds is the device's: torch.cuda.max_memory_allocated on both sides (None on CPU)
    report["peak_gpu_ratio_vs_trl"] = ratio(ref.get("peak_gpu_gib"), trl.get("peak_gpu_gib")) if trl_ok else None
    pub = report["published_trl"]
    comparable = all(report["workload"].get(k) == v for k, v in PUBLISHED_WORKLOAD.items())
    report["episodes_per_s_ratio_vs_published_trl"] = (
        ratio(ref.get("episodes_per_s"), pub["episodes_per_s"]) if comparable else None
    )
    report["peak_rss_ratio_vs_published_trl"] = (
        ratio(ref.get("peak_rss_gib"), pub["peak_rss_gib"]) if comparable else None
    )
    ref_rounds, trl_rounds = ref.get("rounds") or [], trl.get("rounds") or []
    report["episodes_per_s_ratio_vs_trl_by_round"] = (
        [ratio(a.get("episodes_per_s"), b.get("episodes_per_s")) for a, b in zip(ref_rounds, trl_rounds)]
        if trl_ok and len(ref_rounds) == len(trl_rounds) > 1
        else None
    )
    rm, rm_trl = (report["configs"].get(n) or {} for n in (RM_REFERENCE_CONFIG, RM_TRL_CONFIG))
    report["rm_pairs_per_s_ratio_vs_trl"] = (
        ratio(rm.get("pairs_per_s"), rm_trl.get("pairs_per_s")) if "error" not in rm and "error" not in rm_trl else None
    )
    if RM_ENSEMBLE_SCORE_CONFIG in report["configs"]:
        report["rm_ensemble_cost_ratio"] = ensemble_cost_ratio(report["configs"][RM_ENSEMBLE_SCORE_CONFIG])
    for res in report["configs"].values():
        if "episodes_per_s" in res:
            res["episodes_per_s_vs_trl"] = (
                ratio(res.get("episodes_per_s"), trl.get("episodes_per_s")) if trl_ok else None
            )
            res["peak_rss_vs_trl"] = ratio(res.get("peak_rss_gib"), trl.get("peak_rss_gib")) if trl_ok else None
    return report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_COLUMNS = (  # (header, key, digits)
    ("config", "name", 0),
    ("ep/s", "episodes_per_s", 3),
    ("s/update", "s_per_update", 1),
    ("gen s", "generation_s", 1),
    ("fwd s", "forward_s", 1),
    ("opt s", "optimization_s", 1),
    ("gen tok/s", "tokens_per_s", 0),
    ("peak RSS GiB", "peak_rss_gib", 2),
    ("peak GPU GiB", "peak_gpu_gib", 2),
    ("ep/s x TRL", "episodes_per_s_vs_trl", 2),
    ("RSS x TRL", "peak_rss_vs_trl", 2),
)


def ppo_results(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The PPO results of a report in the order they are shown: our configurations, then TRL's (named) if run."""
    rows = [r for r in report["configs"].values() if r.get("kind") == "ppo"]
    if report.get("trl"):
        rows.append({**report["trl"], "name": report["trl"].get("name", TRL_CONFIG_NAME)})
    return rows


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of the PPO configurations (+ TRL), the RM stage line and the headline ratios."""
    rows = [r for r in ppo_results(report) if "episodes_per_s" in r or "error" in r]
    lines = [
        "| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('name')} | failed: {r['error'][:80]} |")
            continue
        lines.append(
            "| " + " | ".join(_fmt(r.get(k), d) if k != "name" else str(r.get(k)) for _, k, d in TABLE_COLUMNS) + " |"
        )
    lines += ["\n" + rm_line(name, r) for name, r in report["configs"].items() if r.get("kind") == "reward_model"]
    if report.get("rm_pairs_per_s_ratio_vs_trl") is not None:
        lines.append(
            f"{RM_REFERENCE_CONFIG} vs {RM_TRL_CONFIG} (the same RewardModelConfig on the same pairs): pairs/s "
            f"x{_fmt(report['rm_pairs_per_s_ratio_vs_trl'])}"
        )
    lines += [
        "\n" + scoring_line(name, r) for name, r in report["configs"].items() if r.get("kind") == "reward_scoring"
    ]
    probes = probe_line(report)
    if probes:
        lines.append("\n" + probes)
    ref = report["reference_config"]
    if report.get("episodes_per_s_ratio_vs_trl") is not None:
        lines.append(
            f"\n{ref} vs TRL 1.12 measured in this run: episodes/s x{_fmt(report['episodes_per_s_ratio_vs_trl'])}, "
            f"peak RSS x{_fmt(report['peak_rss_ratio_vs_trl'])}"
            + (
                f", peak GPU memory x{_fmt(report['peak_gpu_ratio_vs_trl'])}"
                if report.get("peak_gpu_ratio_vs_trl") is not None
                else ""
            )
        )
        if report.get("episodes_per_s_ratio_vs_trl_by_round"):
            lines.append(
                "episodes/s ratio of each round (ours and TRL taking turns): "
                + ", ".join(f"x{_fmt(r)}" for r in report["episodes_per_s_ratio_vs_trl_by_round"])
            )
    else:
        lines.append("\nTRL 1.12 not measured in this run (--trl runs it); ratios in JSON: null")
    if report.get("episodes_per_s_ratio_vs_published_trl") is None:
        lines.append("(no ratio vs TRL's published figures: this workload differs from the published one)")
        return "\n".join(lines)
    lines.append(
        f"{ref} vs TRL 1.12's PUBLISHED figures ({report['published_trl']['episodes_per_s']} ep/s, "
        f"{report['published_trl']['peak_rss_gib']} GiB; not this run): episodes/s "
        f"x{_fmt(report.get('episodes_per_s_ratio_vs_published_trl'))}, peak RSS "
        f"x{_fmt(report.get('peak_rss_ratio_vs_published_trl'))}"
    )
    return "\n".join(lines)


def rm_line(name: str, rm: dict[str, Any]) -> str:
    """One reward-model configuration's line: who trained, with what, how fast (a whole training timed)."""
    trainer = rm.get("trainer", "RewardTrainer")  # results written before the rm-trl configuration: all TRL's
    if "error" in rm:
        return f"{name} ({trainer}): failed: {rm['error'][:200]}"
    if "seconds" not in rm:  # those results timed steps after a warm-up, not a whole training
        return (
            f"{name} ({trainer}, {rm.get('setup')}): {_fmt(rm.get('pairs_per_s'), 2)} pairs/s, "
            f"{_fmt(rm.get('s_per_step'), 2)} s/step of {rm.get('pairs_per_step')} pairs "
            f"(~{rm.get('mean_sequence_tokens')} tokens/sequence), peak RSS {_fmt(rm.get('peak_rss_gib'))} GiB"
        )
    return (
        f"{name} ({trainer}, {rm.get('setup')}): {_fmt(rm.get('pairs_per_s'), 2)} pairs/s, "
        f"{rm.get('pairs')} pairs x {_fmt(rm.get('num_train_epochs'), 1)} epochs in {_fmt(rm.get('seconds'), 1)} s "
        f"({rm.get('steps')} steps, {_fmt(rm.get('s_per_step'), 2)} s/step of {rm.get('pairs_per_step')} pairs), "
        f"trunk cached: {rm.get('cached_trunk_blocks')} blocks, ~{rm.get('mean_sequence_tokens')} tokens/sequence, "
        f"peak RSS {_fmt(rm.get('peak_rss_gib'))} GiB"
    )


def scoring_line(name: str, result: dict[str, Any]) -> str:
    """The ensemble-scoring configuration's line: seconds of one member and of the ensemble, their ratio (pooled
    over rounds) and the ratio the block count predicts."""
    if "error" in result:
        return f"{name} ({result.get('scorer', 'scoring')}): failed: {result['error'][:200]}"
    return (
        f"{name} ({result.get('setup')}): {result.get('sequences')} sequences (~{result.get('mean_sequence_tokens')} "
        f"tokens) in {_fmt(result.get('single_s'), 2)} s by one member ({_fmt(result.get('sequences_per_s_single'), 1)}"
        f" seq/s), {_fmt(result.get('ensemble_s'), 2)} s by {result.get('members')} combined "
        f"({_fmt(result.get('sequences_per_s_ensemble'), 1)} seq/s): cost x{_fmt(ensemble_cost_ratio(result))} "
        f"(block forwards x{_fmt(result.get('expected_block_ratio'))}), peak RSS {_fmt(result.get('peak_rss_gib'))} GiB"
    )


def probe_line(report: dict[str, Any]) -> str:
    """The host probe's matmul times before each measured process, in the order they ran ('' if none)."""
    runs = ppo_results(report)

    def times(probe: dict[str, Any]) -> str:
        return " / ".join(
            f"{_fmt(m.get('ms_median'), 1)} ({_fmt(m.get('ms_min'), 1)})"
            for m in (probe.get(f"{d}_matmul") or {} for d in PROBE_MATMULS)
        )

    parts = []
    for r in runs:
        rounds = r.get("rounds") or [r]
        parts += [
            f"{r['name']}{f' r{i}' if len(rounds) > 1 else ''} {times(p)}"
            for i, p in ((i, x.get("host_probe_before")) for i, x in enumerate(rounds, 1))
            if p and "error" not in p
        ]
    if not parts:
        return ""
    sizes = " / ".join(f"{d} {n}^3" for d, (_, n) in PROBE_MATMULS.items())
    return (
        f"host probe before each run, median (fastest) ms of a {sizes} matmul -- the same work, so higher means "
        "a more contended host: " + "; ".join(parts)
    )
