"""Where a finished pipeline run's time went, phase by phase, and what it achieved, as JSON (what docs/performance.md's
cost table reads).

    python scripts/pipeline_costs.py outputs/<run> [--peak-rss-gib X] > docs/pipeline/costs.json

Everything comes from what the run recorded: each stage's start and end (manifest.json), the reward model's trunk
and training seconds (reward_model/training.json) and its held-out evaluation (summary.json), the PPO phases summed
over updates (ppo/metrics.jsonl: time/generation, time/forward, time/optimization), and the evaluation's reference,
policy sampling and scoring seconds (eval/results.json; the rest of that stage is the over-optimisation curve).
``--peak-rss-gib``: the whole command's peak resident memory, measured outside the run (e.g. ``/usr/bin/time -v``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_lib.core.io import read_jsonl  # noqa: E402

PPO_PHASES = ("time/generation", "time/forward", "time/optimization", "time/update")


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def stage_seconds(manifest: dict[str, Any]) -> dict[str, float]:
    """Wall seconds of each finished stage, from its recorded start and end."""
    out = {}
    for stage, info in manifest.get("stages", {}).items():
        if info.get("status") == "done" and info.get("started") and info.get("ended"):
            took = dt.datetime.fromisoformat(info["ended"]) - dt.datetime.fromisoformat(info["started"])
            out[stage] = round(took.total_seconds(), 1)
    return out


def ppo_phases(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """PPO phase seconds summed over updates, the first update apart (it compiles), and the peak RSS."""
    if not rows:
        return {}
    out: dict[str, Any] = {"updates": len(rows)}
    for key in PPO_PHASES:
        name = key.split("/")[1]
        out[f"{name}_s"] = round(sum(float(r.get(key) or 0.0) for r in rows), 1)
        out[f"first_update_{name}_s"] = round(float(rows[0].get(key) or 0.0), 1)
    out["peak_rss_gib"] = round(max(float(r.get("memory/peak_rss_gib") or 0.0) for r in rows), 2)
    return out


def costs(run: Path, peak_rss_gib: float | None = None) -> dict[str, Any]:
    manifest = _read(run / "manifest.json")
    summary = _read(run / "summary.json")
    training = _read(run / "reward_model" / "training.json")
    results = _read(run / "eval" / "results.json")
    rm = summary.get("reward_model", {})
    trunk, train = training.get("trunk_seconds"), training.get("train_seconds")
    return {
        "run": run.name,
        "git": manifest.get("git"),
        "device": manifest.get("device"),
        "stages_s": stage_seconds(manifest),
        "reward_model": {
            "trunk_s": trunk,  # the frozen blocks once over the training pairs
            "epochs_s": None if trunk is None or train is None else round(train - trunk, 1),
            "train_s": train,
            "heldout_eval_s": rm.get("eval_seconds"),
            "n_train_pairs": training.get("n_train_pairs"),
            "cached_trunk_blocks": training.get("cached_trunk_blocks"),
        },
        "ppo": ppo_phases(read_jsonl(run / "ppo" / "metrics.jsonl")),
        "eval": {**results.get("seconds", {}), "reference_cached": results.get("reference_cached")},
        "peak_rss_gib": peak_rss_gib,
        "outcome": outcome(summary),
    }


def outcome(summary: dict[str, Any]) -> dict[str, Any]:
    """What the run achieved: reward-model accuracy vs gold, gold before / after PPO, the gain, KL and win rate."""
    ev = summary.get("eval", {})
    before, after = ev.get("before", {}), ev.get("after", {})
    gold = (before.get("gold_score"), after.get("gold_score"))
    return {
        "rm_accuracy_vs_gold": summary.get("reward_model", {}).get("eval_accuracy_vs_gold"),
        "gold_reference": gold[0],
        "gold_policy": gold[1],
        "gold_gain": None if None in gold else gold[1] - gold[0],
        "kl": after.get("kl"),
        "win_rate_vs_ref": ev.get("win_rate_vs_ref"),
        "win_rate_ci": ev.get("win_rate_ci"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder (outputs/<run>)")
    parser.add_argument("--peak-rss-gib", type=float, default=None, help="the command's peak RSS, measured outside")
    args = parser.parse_args(argv)
    if not (args.run / "manifest.json").exists():
        raise SystemExit(f"{args.run}: no manifest.json; give a run folder that `make pipeline` wrote")
    print(json.dumps(costs(args.run, args.peak_rss_gib), indent=1))


if __name__ == "__main__":
    main()
