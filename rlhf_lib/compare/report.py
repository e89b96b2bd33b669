"""What notebook 06 shows of a comparison's summary.json: the KL–gold frontier with every method, the proxy-vs-gold
panel, the table ranked by gold at matched KL, and side-by-side samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

STYLE = {  # curve -> (label, marker)
    "ppo": ("PPO (checkpoints)", "o"),
    "ppo_average": ("PPO, seeds averaged (per eta)", "*"),
    "best_of_n": ("best-of-N (RM)", "s"),
    "best_of_n_oracle": ("best-of-N (oracle, gold)", "^"),
    "dpo": ("DPO (per beta)", "D"),
    "rloo": ("RLOO (per beta)", "v"),
    "grpo": ("GRPO (per beta)", "P"),
}


def curve_style(curve: str) -> tuple[str, str]:
    """(label, marker) of a curve: STYLE's, and for ``<curve>:<variant>`` (a PPO run, a reward ranked or optimised)
    its curve's marker with the variant in the label."""
    if curve in STYLE:
        return STYLE[curve]
    head, _, variant = curve.partition(":")
    if head in STYLE and variant:
        label, marker = STYLE[head]
        return f"{label}, {variant}", marker
    return curve, "o"


TABLE_COLUMNS = [
    "method",
    "setting",
    "kl",
    "kl_analytic",
    "gold_score",
    "gold_score_se",
    "rm_score",
    "win_rate_vs_ref",
    "length",
    "eos_fraction",
    "train_seconds",
    "generated_tokens",
]


def methods_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per (method, setting) with the summary keys; win_rate_ci split into two columns."""
    df = pd.DataFrame(summary["methods"])
    if "win_rate_ci" in df:
        df["win_rate_ci_low"] = [ci[0] for ci in df["win_rate_ci"]]
        df["win_rate_ci_high"] = [ci[1] for ci in df["win_rate_ci"]]
    if "curve" not in df:
        df["curve"] = df["method"]
    return df


def _x(df: pd.DataFrame) -> pd.Series:
    """KL on the frontier: the measured one, the analytic one for best-of-N (the formula Gao et al. plot against)."""
    return df["kl_analytic"].where(df["kl_analytic"].notna(), df["kl"]) if "kl_analytic" in df else df["kl"]


def plot_frontier(summary: dict[str, Any], path: str | Path | None = None):
    """Left: gold vs KL to the reference per curve (± 1 s.e.), the reference as a star. Right: RM (proxy) vs gold."""
    import matplotlib.pyplot as plt

    df = methods_frame(summary)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    ref = df[df["method"] == "reference"]
    for curve, group in df[df["method"] != "reference"].groupby("curve", sort=False):
        label, marker = curve_style(curve)
        group = group.assign(x=_x(group)).sort_values("x")
        ax.errorbar(
            group["x"],
            group["gold_score"],
            yerr=group["gold_score_se"],
            marker=marker,
            capsize=3,
            label=label,
            linestyle="--" if curve == "best_of_n_oracle" else "-",
        )
        ax2.plot(group["rm_score"], group["gold_score"], marker=marker, label=label, linestyle="none")
    for axis, x in ((ax, 0.0), (ax2, None)):
        if len(ref) and ref["gold_score"].notna().all():
            axis.plot(
                [x if x is not None else ref["rm_score"].iloc[0]],
                ref["gold_score"],
                "k*",
                markersize=12,
                label="reference",
            )
    ax.set_xlabel("KL(policy || reference), nats per sequence (best-of-N: log N - (N-1)/N)")
    ax.set_ylabel("gold score (mean ± s.e. over eval prompts)")
    ax.set_title("KL–gold frontier: every method")
    ax2.set_xlabel("reward-model score (proxy)")
    ax2.set_ylabel("gold score")
    ax2.set_title("proxy vs gold")
    for axis in (ax, ax2):
        axis.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def kl_table(summary: dict[str, Any], sort_at: str | None = None) -> pd.DataFrame:
    """Gold at matched KL, one row per curve, best first at `sort_at` (default: the middle KL point)."""
    table = pd.DataFrame(summary["gold_at_kl"]).T
    table.columns = [f"gold @ {c} nats" for c in table.columns]
    if len(table.columns):
        key = f"gold @ {sort_at} nats" if sort_at else table.columns[len(table.columns) // 2]
        table = table.sort_values(key, ascending=False, na_position="last")
    table.index.name = "curve"
    return table


def results_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Every (method, setting) with its numbers and cost, rounded for reading."""
    df = methods_frame(summary)
    cols = [c for c in TABLE_COLUMNS if c in df] + [c for c in ("win_rate_ci_low", "win_rate_ci_high") if c in df]
    return df[cols].round(3)


def _num(value: Any, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def methods_markdown(summary: dict[str, Any]) -> str:
    """A Markdown table of every (method, setting): KL (best-of-N: analytic, measured), gold ± s.e., RM, win rate
    vs the reference with its CI, EOS rate and training cost, in the summary's order."""
    lines = [
        "| method | setting | KL (nats) | gold ± s.e. | RM score | win rate vs reference [CI] | EOS rate | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["methods"]:
        kl = _num(e.get("kl"), 2)
        if e.get("kl_analytic") is not None:
            kl = f"{_num(e['kl_analytic'], 2)} (measured {kl})"
        ci = e.get("win_rate_ci") or [None, None]
        win = (
            "–" if e.get("win_rate_vs_ref") is None else f"{_num(e['win_rate_vs_ref'])} [{_num(ci[0])}, {_num(ci[1])}]"
        )
        gold = f"{_num(e.get('gold_score'))} ± {_num(e.get('gold_score_se'))}"
        cells = [curve_label(summary, e.get("curve") or e["method"]), e.get("setting") or "", kl, gold]
        cells += [_num(e.get("rm_score")), win, _num(e.get("eos_fraction")), _num(e.get("train_seconds"), 0)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + mixed_note(summary)


OTHER_BASE = " (other base)"  # marks a curve trained on other data / another reward model than the comparison's


def curve_label(summary: dict[str, Any], curve: str) -> str:
    return curve + OTHER_BASE if curve in summary.get("mixed_bases", []) else curve


def mixed_note(summary: dict[str, Any]) -> str:
    """A line under a table naming the curves whose runs rest on another base, or nothing."""
    if not summary.get("mixed_bases"):
        return ""
    names = ", ".join(summary["mixed_bases"])
    return (
        f"\n\n{names}: trained on other data or another reward model than this comparison's base run, so its gold "
        "differences mix two setups; compare it by its own base."
    )


def best_points(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per curve, its entry with the highest gold (the reference is not a curve)."""
    best: dict[str, dict[str, Any]] = {}
    for e in summary["methods"]:
        curve = e.get("curve") or e["method"]
        if e["method"] == "reference" or e.get("gold_score") is None:
            continue
        if curve not in best or e["gold_score"] > best[curve]["gold_score"]:
            best[curve] = e
    return best


def frontier_markdown(summary: dict[str, Any], rank_at: str | None = None) -> str:
    """A Markdown table, one row per curve ranked by gold at matched KL (at `rank_at` nats, default the first KL
    point; curves that do not reach it last, by their best gold): gold interpolated at each KL point ("–": the curve
    does not reach that KL), then the curve's best point (gold ± s.e., setting, KL) and that point's training cost."""
    at = summary["gold_at_kl"]
    points = list(next(iter(at.values()), {}))
    rank_at = rank_at or (points[0] if points else None)
    best = best_points(summary)

    def order(curve: str) -> tuple[int, float]:
        g = at.get(curve, {}).get(rank_at) if rank_at else None
        return (0, -g) if g is not None else (1, -best[curve]["gold_score"])

    head = " | ".join(f"gold @ {k} nats" for k in points)
    lines = [
        f"| method | {head} | best gold ± s.e. (setting, KL) | its training s | its generated tokens |",
        "|---|" + "---|" * (len(points) + 3),
    ]
    for curve in sorted(best, key=order):
        e = best[curve]
        gold = (
            f"{_num(e['gold_score'])} ± {_num(e.get('gold_score_se'))} ({e.get('setting') or ''}, {_num(e['kl'], 2)})"
        )
        cells = [curve_label(summary, curve), *(_num(at.get(curve, {}).get(k)) for k in points), gold]
        cells += [_num(e.get("train_seconds"), 0), f"{int(e.get('generated_tokens') or 0):,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + mixed_note(summary)


def samples_table(samples_path: str | Path, n_prompts: int = 2) -> pd.DataFrame:
    """Side by side: one row per (method, setting), one column per prompt (the first n_prompts)."""
    rows = pd.read_json(samples_path, lines=True)
    rows = rows[rows["prompt_index"] < n_prompts]
    table = rows.pivot_table(
        index=["curve", "setting"], columns="prompt_index", values="response", aggfunc="first", sort=False
    )
    prompts = rows.drop_duplicates("prompt_index").set_index("prompt_index")["prompt"]
    table.columns = [f"prompt {i}: {prompts[i][:60]}" for i in table.columns]
    return table
