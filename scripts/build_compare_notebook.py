"""Write notebooks/06_compare_methods.ipynb: `python scripts/build_compare_notebook.py`.

A thin notebook: a parameters cell of literals (papermill injects the command's values after it), then library calls
-- the comparison (restartable: trained settings are reused), the frontier figure, the table ranked by gold at
matched KL, every method's numbers and cost, and side-by-side samples.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "notebooks" / "06_compare_methods.ipynb"

CELLS = [
    (
        "markdown",
        """\
# 06 · Beyond PPO: best-of-N, DPO, RLOO and GRPO on one KL–gold frontier

Every method uses the **same base run**: its stage-1 data (DPO trains on the preference pairs; RLOO/GRPO/PPO on the
PPO prompts) and its stage-2 reward model (the proxy every method optimises or ranks by). Every policy is then
evaluated by the evaluation stage's own code on the same held-out prompts with the same sampling seed: gold
(hidden objective), RM score, KL to the reference measured on the samples, win rate vs the reference's sample.
Best-of-N is plotted at its analytic KL, log N − (N − 1)/N (Stiennon et al. 2020; Gao et al. 2022); its measured KL
is in the table. Run with `make compare BASE_RUN=<run>`.""",
    ),
    (
        "code",
        """\
# Parameters (papermill injects the command's values after this cell). Defaults: the smoke profile.
params = "../params/compare/smoke.yaml"  # comparison profile
base_run = ""  # run whose data/ and reward_model/ are used; "": the profile's compare.base_run
run = ""  # output run name; "": the profile's common.run
outputs_dir = ""  # outputs folder; "": the profile's, else the repo's outputs/
threads = 0  # torch threads; 0: the profile's common.threads""",
    ),
    (
        "code",
        """\
from pathlib import Path
from rlhf_lib import compare
from rlhf_lib.compare import report
from rlhf_lib.core.runs import outputs_root

profile = compare.load_profile(
    params, base_run=base_run or None, run=run or None, outputs_dir=outputs_dir or None, threads=threads or None
)
summary = compare.run_comparison(profile)
out_dir = outputs_root(profile.compare) / profile.compare.run""",
    ),
    (
        "markdown",
        "## The frontier\nLeft: gold vs KL, one curve per method (± 1 standard error over prompts). "
        "Right: proxy (RM) vs gold — where a method's RM score rises and gold does not, it over-optimises.",
    ),
    ("code", 'fig = report.plot_frontier(summary, out_dir / "plots" / "compare_frontier.png")'),
    (
        "markdown",
        "## Gold at matched KL\nGold linearly interpolated along each curve (which starts at the reference); "
        "empty outside a curve's KL range.",
    ),
    ("code", "report.kl_table(summary)"),
    (
        "markdown",
        "## Every method: numbers and cost\n`train_seconds` (wall, this machine) and `generated_tokens` "
        "(sampled during training; for best-of-N, at inference: N responses per prompt).",
    ),
    ("code", "report.results_table(summary)"),
    (
        "markdown",
        "## Side-by-side samples\nThe first prompts of the eval set (file order, not cherry-picked); "
        "best-of-N shows the RM's pick among the first N pool samples.",
    ),
    ("code", 'report.samples_table(out_dir / "samples.jsonl", profile.compare.n_sample_rows)'),
    (
        "markdown",
        "## Past best-of-16 within the KL budget?\nEvery point with its 95 % interval (over seeds where a point holds "
        "several runs' policies, else over prompts); the best trained point at KL ≤ 6 nats against best-of-16 under "
        "the same reward, the difference paired by prompt; and Gao et al.'s best-of-N fit d(α − βd), d = √KL: "
        "where reward-ranked gold would stop rising; last, each reward's accuracy vs gold on the held-out pairs "
        "(an ensemble's combinations, WARM and members). Saved as `frontier.json` beside `summary.json`.",
    ),
    (
        "code",
        """\
import json
from IPython.display import Markdown
from rlhf_lib.compare import frontier

view = json.loads((out_dir / "frontier.json").read_text())
tables = [frontier.best_markdown, frontier.fit_markdown, frontier.points_markdown, frontier.rewards_markdown]
Markdown("\\n\\n".join(table(view) for table in tables))""",
    ),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in CELLS:
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        nb.cells.append(cell)
    nb.cells[1].metadata["tags"] = ["parameters"]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    nbformat.write(build(), str(TARGET))
    print(f"wrote {TARGET}")
