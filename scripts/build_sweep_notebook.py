"""Write notebooks/05_sweep.ipynb (the thin sweep notebook): `python scripts/build_sweep_notebook.py`.

Kept apart from scripts/build_notebooks.py because its parameters are not a stage config: the sweep's name and the
folder holding it. `make sweep` (python -m rlhf_lib.sweeps) executes it with papermill on a finished sweep.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
PATH = ROOT / "notebooks" / "05_sweep.ipynb"

INTRO = """\
# Sweep — seeds and parameters, every number with its spread

Loads a finished sweep (`make sweep SWEEP=params/sweeps/<name>.yaml`, which runs this notebook at the end) and shows
each point, per grid cell the mean and 95 % confidence interval over seeds, and the KL–gold frontier with the fit
of Gao et al. (2022)'s functional form. Everything shown is read from `outputs/<sweep>/summary.json`."""

PARAMETERS = """\
# Parameters (papermill injects overrides after this cell; `make sweep` sets both)
sweep = "smoke"  # sweep name: the folder <outputs_dir>/<sweep>/ written by python -m rlhf_lib.sweeps
outputs_dir = \"\"  # the folder holding the sweep folder; "": the repo's outputs/"""

CELLS = [
    ("md", INTRO),
    ("parameters", PARAMETERS),
    (
        "code",
        "from rlhf_lib import sweeps\n"
        "folder = sweeps.sweep_dir(sweep, outputs_dir)\n"
        "summary = sweeps.load_summary(folder)\n"
        "print(f\"{folder}: {len(summary['points'])} points in {len(summary['groups'])} grid cells; \"\n"
        "      f\"{summary['wall_seconds'] / 60:.1f} min of runs; seeds over {summary['seed_key']}\")",
    ),
    (
        "md",
        "## Points\nEach point is an ordinary run folder (`outputs/<sweep>/<point>/`); `status` is `done` when "
        "all its stages finished.",
    ),
    ("code", "sweeps.points_table(summary)"),
    (
        "md",
        "## Per grid cell: mean ± 95 % confidence interval over seeds\nStudent t interval: "
        "mean ± t(0.975, n − 1) · sd / √n, sd with n − 1 (`summary.json` `groups` has every numeric key). "
        "`derived.gold_gain` is the trained policy's gold score minus the reference's on the same prompts and seed.",
    ),
    ("code", "sweeps.group_table(summary)"),
    ("code", "sweeps.plot_group_metrics(summary, sweeps.HEADLINE_KEYS[:4], folder)"),
    (
        "md",
        "## KL–gold frontier: proxy (RM) beside gold\nOne line per grid cell through its evaluated checkpoints "
        "(star: final policy), seed means with 95 % Student-t intervals over seeds (as the tables). Where the RM "
        "gain keeps rising while gold bends down, the policy over-optimises the reward model. Dashed: gold(d) = "
        "d (α − β log d), d = √KL, fitted by least squares to every point's gold gain over its reference.",
    ),
    ("code", "sweeps.plot_sweep_frontier(summary, folder)"),
    ("code", "sweeps.frontier_table(summary)"),
    (
        "md",
        "## Fit and choice of the KL coefficient\n`kl_at_peak` / `gold_at_peak`: where the fitted gold gain peaks "
        "(d* = exp(α/β − 1)). `selection`: the grid cell with the largest seed-mean gold at seed-mean KL ≤ 6 "
        "nats.",
    ),
    ("code", '{"frontier_fit": summary["frontier_fit"], "selection": summary["selection"]}'),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(CELLS):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        if kind == "parameters":
            cell.metadata["tags"] = ["parameters"]
        cell.id = f"sweep-{i:02d}"  # stable ids: a rebuild changes only what changed
        nb.cells.append(cell)
    return nb


def main() -> None:
    nb = build()
    nbformat.validate(nb)
    nbformat.write(nb, PATH)
    print("wrote", PATH.relative_to(ROOT))


if __name__ == "__main__":
    main()
