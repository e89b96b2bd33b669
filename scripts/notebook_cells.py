"""Cell lists of the four stage notebooks (built by scripts/build_notebooks.py).

House rules: one parameters cell of literals, a resolve cell, then short cells that each call one rlhf_lib function
and show its result, and a final summary cell whose rounded output nbval checks (NBVAL_CHECK_OUTPUT).
"""

import nbformat


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str, tags: list[str] | None = None) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = tags
    return cell


RESOLVE = """\
from rlhf_lib import {modules}
from rlhf_lib.core import config, runs
cfg = config.from_namespace("{stage}", globals())   # typed, validated config (unknown keys / wrong types fail here)
run = runs.start_stage(cfg, "{stage}")               # seeds, threads, manifest.json; refuses to redo a finished stage
print(f"run folder: {{run.root}}")"""

SUMMARY = """\
# NBVAL_CHECK_OUTPUT
# (nbval compares this cell's output with the stored one, so a regression in a number fails CI)
summary = runs.finish_stage(run, "{stage}", {expr})
runs.rounded(summary, {digits})"""

DATA = (
    "Stage 1 — preference data",
    "Builds the preference pairs the reward model learns from, and the prompt-only sets PPO trains on and the "
    "evaluation stage tests on.\nOffline default: responses sampled from the bundled SmolLM2 labelled by a simulated "
    "annotator (VADER sentiment gold score + Bradley–Terry noise); online: ultrafeedback / hh-rlhf / plain files.",
    [
        code(RESOLVE.format(modules="data", stage="data")),
        md(
            "## Build the datasets\nPairs are split by prompt (no prompt is shared between reward-model, PPO and "
            "evaluation sets). Dropped and truncated items are counted with their reason."
        ),
        code("report = data.prepare_data(cfg, run)\nreport"),
        md(
            "## What the data looks like\nLeft: gold (or dataset) scores of chosen vs rejected. "
            "Middle: response lengths. "
            "Right: how often the annotator agreed with the gold ordering as the gold gap grows (Bradley–Terry)."
        ),
        code("data.plot_data_overview(run)"),
        code("data.sample_pairs(run, n=3)"),
        md(
            "## Summary\n`label_gold_agreement`: share of held-out pairs whose label matches the gold ordering (the "
            "annotator's noise). `length_baseline_accuracy`: a predictor that always prefers the longer response."
        ),
        code(SUMMARY.format(stage="data", expr="report.summary", digits=3)),
    ],
)

REWARD = (
    "Stage 2 — reward model",
    "Trains a scalar Bradley–Terry reward model on the stage-1 pairs with TRL's RewardTrainer and evaluates it on "
    "held-out pairs.\nThe saved model (and its reward statistics for normalisation) is what PPO optimises against.",
    [
        code(RESOLVE.format(modules="reward", stage="reward_model")),
        md(
            "## Train\nThe score head starts at zero with its own learning rate (a fresh random head leaves a small "
            "model at chance, see docs/design_history.md). The model that is saved is the model that was trained."
        ),
        code("trained = reward.train_reward_model(cfg, run)\ntrained.summary"),
        code("reward.plot_training_curve(trained.log_history, run)"),
        md(
            "## Evaluate on held-out pairs\nTies count as wrong. `eval_accuracy_vs_gold` compares with the hidden gold "
            "ordering (simulated data); the length-only baseline shows how much is just length."
        ),
        code("evaluation = reward.evaluate_reward_model(cfg, run)\nevaluation"),
        code("reward.plot_calibration(evaluation, run)"),
        code("reward.plot_accuracy_by_strength(evaluation, run)"),
        code("reward.plot_margins(evaluation, run)"),
        code("evaluation.pairs.head(5)"),
        md("## Summary"),
        code(SUMMARY.format(stage="reward_model", expr="{**trained.summary, **evaluation.summary}", digits=3)),
    ],
)

PPO = (
    "Stage 3 — PPO",
    "Optimises the policy against the stage-2 reward model with PPO and a KL penalty to the reference policy "
    "(our own loop on `accelerate`, following the N+ implementation details of RLHF with PPO).\nMetric names follow "
    "TRL's (`objective/kl`, `objective/scores`, ...); the README explains each one and what healthy values look like.",
    [
        code(RESOLVE.format(modules="ppo", stage="ppo")),
        md(
            "## Train\nA progress bar shows updates, score and KL. Metrics go to `ppo/metrics.jsonl`, "
            "sample completions "
            "to `ppo/samples.jsonl`, checkpoints to `checkpoints/`."
        ),
        code("result = ppo.train_ppo(cfg, run)\nresult.metrics.tail(3)"),
        md(
            "## Training curves\n`objective/scores` should rise while `objective/kl` stays moderate; a collapsing "
            "entropy or a clip fraction near 1 are warning signs."
        ),
        code("ppo.plot_ppo_curves(run)"),
        md("## Sample completions along training"),
        code("ppo.sample_table(run).tail(8)"),
        md("## Summary"),
        code(SUMMARY.format(stage="ppo", expr="result.summary", digits=2)),
    ],
)

EVAL = (
    "Stage 4 — evaluation: did RLHF work?",
    "Samples from the reference and the trained policy on held-out prompts with the same settings and seeds, and "
    "compares reward-model score, gold score, KL, length and EOS rate.\nThen the over-optimisation view (proxy vs gold "
    "along training), side-by-side samples and a comparison with other runs.",
    [
        code("import pandas as pd\n" + RESOLVE.format(modules="evaluate, ppo", stage="eval")),
        md(
            "## Before vs after on held-out prompts\n`kl` is measured on these samples (sum over response tokens of "
            "log π − log π_ref), not read from training logs."
        ),
        code(
            "result = evaluate.evaluate_policies(cfg, run)\n"
            'pd.DataFrame({k: result.summary[k] for k in ("before", "after")})'
        ),
        code('{k: result.summary[k] for k in ("win_rate_vs_ref", "win_rate_ci", "win_rate_ties", "win_rate_judge")}'),
        code("evaluate.plot_reward_distributions(result, run)"),
        md("## Side by side"),
        code("evaluate.sample_table(result)"),
        md("## Training curves (from stage 3)"),
        code("ppo.plot_ppo_curves(run)"),
        md(
            "## Over-optimisation: proxy (RM) vs gold along training\n"
            "Each point is a saved PPO checkpoint, evaluated on "
            "held-out prompts. Where the RM score keeps rising but the gold score flattens or falls, the policy is "
            "exploiting the reward model (Gao et al. 2022)."
        ),
        code("curve = evaluate.overoptimisation_curve(cfg, run)\ncurve"),
        code("evaluate.plot_frontier(curve, run)"),
        md("## Compare runs\nAdd other run names to `compare_runs` (e.g. two `kl_coef` values, LoRA vs full)."),
        code("comparison = evaluate.compare_runs(evaluate.comparison_run_dirs(cfg, run))\ncomparison"),
        code("evaluate.plot_run_comparison(comparison, run)"),
        md("## Summary"),
        code(SUMMARY.format(stage="eval", expr="evaluate.stage_summary(result, curve)", digits=2)),
    ],
)

NOTEBOOK_SPECS = {"data": DATA, "reward_model": REWARD, "ppo": PPO, "eval": EVAL}
