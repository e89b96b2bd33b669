"""Statistics of a finished sweep: over-seed means and intervals, the KL-gold frontier, its fit, the selection rule.

Pure functions of point summaries (``rlhf_lib.sweeps.runner`` runs the points and calls them), plus the tables the
sweep notebook and the README headline show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlhf_lib.core.io import repo_root

# Numbers computed from a point's summary: key -> (minuend, subtrahend); gains paired on the same prompts and seed.
DERIVED = {
    "derived.gold_gain": ("eval.after.gold_score", "eval.before.gold_score"),
    "derived.rm_gain": ("eval.after.rm_score", "eval.before.rm_score"),
}
GAIN_TARGET = (
    "gold gain over the reference policy: gold score of a checkpoint minus that of the reference, both on "
    "the same run's over-optimisation prompts"
)


# ----------------------------------------------------------------------------------------------------------------
# aggregation


def numeric_leaves(summary: dict[str, Any]) -> dict[str, float]:
    """Every int/float leaf of a run summary as a dotted key (short numeric lists as key.0, key.1), plus DERIVED."""
    out: dict[str, float] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(obj, (list, tuple)) and 0 < len(obj) <= 4:
            for i, value in enumerate(obj):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    walk(f"{prefix}.{i}", value)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            out[prefix] = float(obj)

    walk("", summary)
    for key, (left, right) in DERIVED.items():
        if left in out and right in out:
            out[key] = out[left] - out[right]
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """mean, sample std (ddof 1), n, the Student-t interval of the mean, mean +- t_{n-1} std / sqrt(n), and the
    prediction interval of one new draw, mean +- t_{n-1} std sqrt(1 + 1/n) (``pi95_*``: where the next seed's value
    falls, e.g. a fresh run's gain); None where undefined."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    empty = {"ci95_low": None, "ci95_high": None, "pi95_low": None, "pi95_high": None}
    if n == 0:
        return {"mean": None, "std": None, **empty, "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "std": None, **empty, "n": 1}
    std = float(x.std(ddof=1))
    t = float(stats.t.ppf(0.5 + level / 2, n - 1))
    half, new = t * std / math.sqrt(n), t * std * math.sqrt(1 + 1 / n)
    return {
        "mean": mean,
        "std": std,
        "ci95_low": mean - half,
        "ci95_high": mean + half,
        "pi95_low": mean - new,
        "pi95_high": mean + new,
        "n": n,
    }


def cell_of(entry: dict[str, Any], seed_key: str) -> tuple:
    """The grid cell of a point: its overrides without the seed key, as a hashable tuple."""
    return tuple((k, v) for k, v in entry["overrides"].items() if k != seed_key)


def group_points(entries: Sequence[dict[str, Any]], seed_key: str) -> list[dict[str, Any]]:
    """One group per grid cell (all overrides but the seed key): n_seeds and per numeric key mean/std/CI."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for entry in entries:
        cells.setdefault(cell_of(entry, seed_key), []).append(entry)
    groups = []
    for cell, members in cells.items():
        done = [m for m in members if m["status"] == "done"]
        values: dict[str, list[float]] = {}
        for m in done:
            for key, value in numeric_leaves(m["summary"]).items():
                values.setdefault(key, []).append(value)
        metrics = {key: mean_ci(v) for key, v in sorted(values.items())}
        groups.append(
            {
                "overrides": dict(cell),
                "n_seeds": len(done),
                "points": [m["name"] for m in done],
                "metrics": metrics,
                # where one new seed's value falls, [low, high] per key (None below two seeds)
                "prediction_interval": {
                    key: None if m["pi95_low"] is None else [m["pi95_low"], m["pi95_high"]]
                    for key, m in metrics.items()
                },
            }
        )
    return groups


def mark_mixed_bases(groups: Sequence[dict[str, Any]], entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set each group's ``bases`` (distinct base-stage hash sets its finished points read; points that recorded none
    are not counted) and ``mixed_bases`` (more than one: its spread mixes two reward models or data sets, so compare
    the cell by gains paired within a point). Returns the mixed groups."""
    by_name = {e["name"]: e for e in entries}
    mixed = []
    for group in groups:
        hashes = [by_name[name].get("base_stages") for name in group["points"] if name in by_name]
        group["bases"] = len({json.dumps(h, sort_keys=True) for h in hashes if h})
        group["mixed_bases"] = group["bases"] > 1
        if group["mixed_bases"]:
            mixed.append(group)
    return mixed


def frontier_rows(entries: Sequence[dict[str, Any]], seed_key: str) -> list[dict[str, Any]]:
    """KL, RM and gold (and their gains over the reference) per point and checkpoint, from eval.overoptimisation
    (the reference row of the same run is the zero of the gains); the final before/after when a run has no curve."""
    rows = []
    for entry in entries:
        ev = (entry.get("summary") or {}).get("eval") or {}
        curve = ev.get("overoptimisation") or []
        ref = next((r for r in curve if r.get("label") == "reference"), None)
        if ref is None and "before" in ev and "after" in ev:
            ref, curve = ev["before"], [{**ev["after"], "label": "final", "step": None}]
        for r in curve:
            if r is ref:
                continue
            row = {
                "point": entry["name"],
                "cell": dict(cell_of(entry, seed_key)),
                "seed": entry["overrides"].get(seed_key),
                "label": r.get("label"),
                "step": r.get("step"),
                "kl": r.get("kl"),
            }
            for name in ("rm_score", "gold_score"):
                if r.get(name) is not None and ref.get(name) is not None:
                    row[name] = r[name]
                    row[name.replace("_score", "_gain")] = r[name] - ref[name]
            rows.append(row)
    return rows


PEAK_EXTRAPOLATION = 10.0  # a fitted peak further than this multiple of the largest measured KL is not reported


def fit_frontier(kl: Sequence[float], gain: Sequence[float]) -> dict[str, Any]:
    """Least-squares fit of Gao et al. (2022)'s RL form gain(d) = d (alpha - beta ln d), d = sqrt(KL).

    Linear in (alpha, beta), so closed form. The fitted gain peaks at d* = exp(alpha / beta - 1) when beta > 0
    (there gain = beta d*); KL <= 0 points carry no information about the curve's shape and are left out.
    """
    kl_arr, y = np.asarray(kl, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    keep = np.isfinite(kl_arr) & np.isfinite(y) & (kl_arr > 0)
    d, y = np.sqrt(kl_arr[keep]), y[keep]
    out: dict[str, Any] = {
        "alpha": None,
        "beta": None,
        "kl_at_peak": None,
        "gold_at_peak": None,
        "n_points": int(d.size),
        "form": "gold_gain(d) = d (alpha - beta ln d), d = sqrt(KL)",
        "target": GAIN_TARGET,
    }
    if d.size < 2 or np.ptp(d) == 0:
        return out
    design = np.stack([d, -d * np.log(d)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ np.array([alpha, beta])
    ss_tot = float(((y - y.mean()) ** 2).sum())
    out.update(alpha=float(alpha), beta=float(beta), r2=1 - float((resid**2).sum()) / ss_tot if ss_tot else None)
    if beta > 0:
        log_d_star = float(alpha / beta) - 1.0  # compared in logs: a beta of ~1e-17 puts the peak past any float
        if 2.0 * log_d_star <= math.log(PEAK_EXTRAPOLATION * float(kl_arr[keep].max())):
            d_star = math.exp(log_d_star)
            out.update(kl_at_peak=d_star**2, gold_at_peak=float(beta) * d_star)
        else:  # the data barely bend: a peak this far out is the fit's extrapolation, not a measurement
            out["peak_note"] = f"fitted peak beyond {PEAK_EXTRAPOLATION:g}x the largest measured KL: not reported"
    return out


def gao_gold(kl: np.ndarray | float, alpha: float, beta: float) -> np.ndarray:
    """The fitted form at KL (0 at KL = 0)."""
    d = np.sqrt(np.maximum(np.asarray(kl, dtype=np.float64), 1e-12))
    return d * (alpha - beta * np.log(d))


def select_default(
    groups: Sequence[dict[str, Any]],
    kl_budget: float = 6.0,
    key: str = "eval.after.gold_score",
    kl_key: str = "eval.after.kl",
    min_seeds: int = 1,
) -> dict[str, Any] | None:
    """The grid cell with the largest seed-mean ``key`` among those whose seed-mean KL is within ``kl_budget``.

    Only cells with at least ``min_seeds`` finished seeds compete: a partly run sweep must not pick a cell on one
    lucky seed.
    """

    def mean(group, name):
        return (group["metrics"].get(name) or {}).get("mean")

    ok = [
        g
        for g in groups
        if g["n_seeds"] >= min_seeds
        and mean(g, key) is not None
        and mean(g, kl_key) is not None
        and mean(g, kl_key) <= kl_budget
    ]
    if not ok:
        return None
    best = max(ok, key=lambda g: mean(g, key))
    return {
        "rule": f"largest seed-mean {key} with seed-mean {kl_key} <= {kl_budget}, over cells with >= {min_seeds} seeds",
        "overrides": best["overrides"],
        "n_seeds": best["n_seeds"],
        key: best["metrics"][key],
        kl_key: best["metrics"][kl_key],
    }


def finite(obj: Any) -> Any:
    """A copy with NaN / inf as None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# reading a finished sweep (the sweep notebook)


def sweep_dir(sweep: str, outputs_dir: str = "") -> Path:
    """<outputs_dir>/<sweep> ("" = the repo's outputs/ folder)."""
    return (Path(outputs_dir).expanduser() if outputs_dir else repo_root() / "outputs") / sweep


def load_summary(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run the sweep first (make sweep SWEEP=params/sweeps/<name>.yaml)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


HEADLINE_KEYS = (
    "eval.after.gold_score",
    "derived.gold_gain",
    "eval.after.rm_score",
    "eval.after.kl",
    "eval.win_rate_vs_ref",
    "reward_model.eval_accuracy_vs_gold",
    "reward_model.eval_accuracy",
)


def group_table(summary: dict[str, Any], keys: Sequence[str] = HEADLINE_KEYS, digits: int = 3):
    """One row per grid cell: its overrides, n_seeds and "mean ± half-width [low, high]" of the headline keys."""
    import pandas as pd

    rows = []
    for group in summary["groups"]:
        row = {k.rsplit(".", 1)[-1]: v for k, v in group["overrides"].items()}
        row["n_seeds"] = group["n_seeds"]
        for key in keys:
            m = group["metrics"].get(key)
            if m is None or m["mean"] is None:
                continue
            if m["ci95_low"] is None:
                row[key] = f"{m['mean']:.{digits}f}"
            else:
                half = (m["ci95_high"] - m["ci95_low"]) / 2
                low, high = m["ci95_low"], m["ci95_high"]
                row[key] = f"{m['mean']:.{digits}f} ± {half:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def points_table(summary: dict[str, Any], keys: Sequence[str] = HEADLINE_KEYS):
    """One row per point: index, name, status (merged: from an earlier summary), overrides, commit, seconds and its
    headline numbers."""
    import pandas as pd

    rows = []
    for entry in summary["points"]:
        flat = numeric_leaves(entry.get("summary") or {})
        row = {
            "index": entry["index"],
            "point": entry["name"],
            "status": entry["status"] + (" (merged)" if entry.get("merged_from") else ""),
            **entry["overrides"],
            "commit": str((entry.get("git") or {}).get("commit") or "")[:7],
            "seconds": entry.get("wall_seconds"),
        }
        row.update({key: flat[key] for key in keys if key in flat})
        rows.append(row)
    return pd.DataFrame(rows).set_index("index")


# Rows of the README headline: (label, summary key of the reference, of the trained policy, derived gain key).
HEADLINE_ROWS = (
    ("gold score (hidden VADER, -1 … 1)", "eval.before.gold_score", "eval.after.gold_score", "derived.gold_gain"),
    ("reward-model score", "eval.before.rm_score", "eval.after.rm_score", "derived.rm_gain"),
    ("KL to the reference (nats / sequence)", None, "eval.after.kl", None),
    ("win rate vs the reference, by gold", None, "eval.win_rate_vs_ref", None),
    ("EOS rate (answers that end)", "eval.before.eos_fraction", "eval.after.eos_fraction", None),
    ("response length (tokens)", "eval.before.length", "eval.after.length", None),
)


def format_ci(m: dict[str, Any] | None, digits: int = 3) -> str:
    """ "mean ± half-width" of a mean_ci dict ("mean" alone for one seed, "–" for none)."""
    if not m or m.get("mean") is None:
        return "–"
    if m.get("ci95_low") is None:
        return f"{m['mean']:.{digits}f}"
    return f"{m['mean']:.{digits}f} ± {(m['ci95_high'] - m['ci95_low']) / 2:.{digits}f}"


def find_group(summary: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The grid cell of a sweep summary with exactly these overrides (all but the seed key)."""
    for group in summary["groups"]:
        if group["overrides"] == overrides:
            return group
    cells = [g["overrides"] for g in summary["groups"]]
    raise KeyError(f"sweep {summary.get('sweep')!r} has no cell {overrides}; its cells: {cells}")


def format_pi(m: dict[str, Any] | None, digits: int = 3) -> str:
    """ "[low, high]" of a mean_ci dict's 95 % prediction interval ("" below two seeds)."""
    if not m or m.get("pi95_low") is None:
        return ""
    return f"[{m['pi95_low']:.{digits}f}, {m['pi95_high']:.{digits}f}]"


def headline_markdown(summary: dict[str, Any], overrides: dict[str, Any], digits: int = 3) -> str:
    """A Markdown table of one grid cell: reference, trained policy and paired gain, each mean ± 95 % t half-width,
    and where one new seed's gain falls (the 95 % prediction interval)."""
    group = find_group(summary, overrides)
    m = group["metrics"]
    setting = ", ".join(f"`{k}` = {v}" for k, v in overrides.items()) or "the default profile"
    lines = [
        f"| {setting}; {group['n_seeds']} seeds, mean ± 95 % CI | reference policy | PPO policy | gain "
        "| gain of one new run (95 % PI) |",
        "|---|---|---|---|---|",
    ]
    for label, ref, after, gain in HEADLINE_ROWS:
        cells = [format_ci(m.get(key), digits) if key else "" for key in (ref, after, gain)]
        cells.append(format_pi(m.get(gain), digits) if gain else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CELL_COLUMNS = (  # (header, summary key) of cells_markdown
    ("gold", "eval.after.gold_score"),
    ("gold gain", "derived.gold_gain"),
    ("RM score", "eval.after.rm_score"),
    ("KL (nats)", "eval.after.kl"),
    ("win rate", "eval.win_rate_vs_ref"),
    ("EOS rate", "eval.after.eos_fraction"),
)


def cells_markdown(summary: dict[str, Any], columns: Sequence[tuple[str, str]] = CELL_COLUMNS, digits: int = 3) -> str:
    """A Markdown table with one row per grid cell: its overrides, finished seeds and mean ± 95 % half-width."""
    keys = list(summary["groups"][0]["overrides"]) if summary["groups"] else []
    lines = [
        "| " + " | ".join([*(f"`{k}`" for k in keys), "seeds", *(h for h, _ in columns)]) + " |",
        "|" + "---|" * (len(keys) + 1 + len(columns)),
    ]
    for group in summary["groups"]:
        values = [str(group["overrides"].get(k)) for k in keys] + [str(group["n_seeds"])]
        values += [format_ci(group["metrics"].get(key), digits) for _, key in columns]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


RM_COLUMNS = (  # (header, summary key) of seeds_markdown for a data + reward-model sweep
    ("RM accuracy vs gold", "reward_model.eval_accuracy_vs_gold"),
    ("vs the annotator's labels", "reward_model.eval_accuracy"),
    ("length-only baseline vs gold", "reward_model.length_baseline_accuracy_vs_gold"),
    ("ECE", "reward_model.eval_ece"),
    ("labels agreeing with gold", "data.label_gold_agreement"),
)


PIPELINE_COLUMNS = (  # (header, summary key) of seeds_markdown for a whole-pipeline seeds sweep
    ("RM accuracy vs gold", "reward_model.eval_accuracy_vs_gold"),
    ("gold, reference", "eval.before.gold_score"),
    ("gold, PPO", "eval.after.gold_score"),
    ("gold gain", "derived.gold_gain"),
    ("KL (nats)", "eval.after.kl"),
    ("win rate vs reference", "eval.win_rate_vs_ref"),
    ("EOS rate, PPO", "eval.after.eos_fraction"),
)


def seeds_markdown(
    summary: dict[str, Any],
    columns: Sequence[tuple[str, str]] = RM_COLUMNS,
    digits: int = 3,
    prediction: bool = False,
) -> str:
    """A Markdown table of a seeds-only sweep: one row per finished point, then the mean ± 95 % half-width, and with
    ``prediction`` the 95 % prediction interval of one new seed."""
    seed_key = summary.get("seed_key", "common.seed")
    lines = ["| seed | " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for point in summary["points"]:
        if point["status"] == "done":
            flat = numeric_leaves(point["summary"])
            values = [f"{flat[key]:.{digits}f}" if key in flat else "–" for _, key in columns]
            lines.append(f"| {point['overrides'].get(seed_key)} | " + " | ".join(values) + " |")
    for group in summary["groups"]:
        values = [format_ci(group["metrics"].get(key), digits) for _, key in columns]
        lines.append(f"| mean ± 95 % CI ({group['n_seeds']} seeds) | " + " | ".join(values) + " |")
        if prediction:
            values = [format_pi(group["metrics"].get(key), digits) or "–" for _, key in columns]
            lines.append("| one new seed, 95 % PI | " + " | ".join(values) + " |")
    return "\n".join(lines)


def seed_values(summary: dict[str, Any], overrides: dict[str, Any], key: str) -> dict[Any, float]:
    """seed -> value of one summary key, over the finished points of one grid cell."""
    seed_key = summary.get("seed_key", "common.seed")
    out = {}
    for point in summary["points"]:
        if point["status"] == "done" and dict(cell_of(point, seed_key)) == overrides:
            value = numeric_leaves(point["summary"]).get(key)
            if value is not None:
                out[point["overrides"].get(seed_key)] = value
    return out


def paired_difference(
    a: dict[str, Any], a_cell: dict[str, Any], b: dict[str, Any], b_cell: dict[str, Any], key: str
) -> dict[str, Any]:
    """B − A of one key, paired by seed over the seeds both cells finished: mean_ci of the per-seed differences."""
    va, vb = seed_values(a, a_cell, key), seed_values(b, b_cell, key)
    seeds = sorted(set(va) & set(vb), key=str)
    return {**mean_ci([vb[s] - va[s] for s in seeds]), "seeds": seeds}


PAIRED_COLUMNS = (*CELL_COLUMNS, ("length (tokens)", "eval.after.length"))


def paired_markdown(
    a: dict[str, Any],
    a_cell: dict[str, Any],
    b: dict[str, Any],
    b_cell: dict[str, Any],
    labels: tuple[str, str],
    rows: Sequence[tuple[str, str]] = PAIRED_COLUMNS,
    digits: int = 3,
) -> str:
    """Two grid cells (of one sweep or two sharing data, reward model and seeds) side by side, and B − A by seed."""
    ga, gb = find_group(a, a_cell), find_group(b, b_cell)
    seeds = paired_difference(a, a_cell, b, b_cell, rows[0][1])["seeds"]
    lines = [
        f"| mean ± 95 % CI; paired over seeds {', '.join(map(str, seeds))} | {labels[0]} | {labels[1]} | difference |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        cells = [format_ci(g["metrics"].get(key), digits) for g in (ga, gb)]
        cells.append(format_ci(paired_difference(a, a_cell, b, b_cell, key), digits))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
