"""Notebook hygiene and params/notebook consistency (papermill only warns on unknown parameters)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import nbformat
import pytest

from rlhf_lib.core import config

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "params").glob("*.yaml"))
NOTEBOOKS = {stage: ROOT / "notebooks" / name for stage, name in config.NOTEBOOKS.items()}


def parameters_cell(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
    return cells[0]


def parameter_names(path: Path) -> dict[str, ast.expr]:
    tree = ast.parse(parameters_cell(path).source)
    names: dict[str, ast.expr] = {}
    for node in tree.body:
        assert isinstance(node, (ast.AnnAssign, ast.Assign)), f"{path.name}: parameters cell holds assignments only"
        target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
        names[target.id] = node.value
    return names


def test_profiles_exist():
    assert {p.stem for p in PROFILES} >= {"default", "smoke", "seed_gpt2_ultrafeedback"}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_key_is_a_notebook_parameter_and_validates(profile):
    params = config.load_params_file(profile)  # raises on unknown keys / wrong types
    for stage, path in NOTEBOOKS.items():
        names = parameter_names(path)
        for key in {**params["common"], **params[stage]}:
            assert key in names, f"{profile.name}: key {key!r} is not in {path.name}'s parameters cell"


@pytest.mark.parametrize("stage", list(NOTEBOOKS))
def test_parameters_cell_is_literals_matching_the_config(stage):
    path = NOTEBOOKS[stage]
    names = parameter_names(path)
    for name, value in names.items():
        ast.literal_eval(value)  # literals only: papermill cannot recompute derived values
    fields = {f.name for f in dataclasses.fields(config.stage_config_class(stage))}
    assert set(names) == fields, f"{path.name}: parameters differ from {stage} config fields"
    values = {k: ast.literal_eval(v) for k, v in names.items()}
    config.validate(config.stage_config_class(stage), values, path.name)


@pytest.mark.parametrize("stage", list(NOTEBOOKS))
def test_committed_notebooks_carry_no_stray_outputs(stage):
    nb = nbformat.read(NOTEBOOKS[stage], as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        checked = "NBVAL_CHECK_OUTPUT" in cell.source
        assert checked or not cell.outputs, f"{NOTEBOOKS[stage].name} cell {i} has stored outputs"
        # only the nbval-checked summary cell keeps outputs (nbval needs an execution count on it)
        assert cell.execution_count == (1 if checked and cell.outputs else None), f"cell {i}: stray execution count"
        assert "def " not in cell.source and "class " not in cell.source, f"cell {i}: no definitions in notebooks"
    checked = [c for c in nb.cells if "NBVAL_CHECK_OUTPUT" in c.source]
    assert len(checked) == 1 and checked[0].outputs, "the summary cell must store the output nbval compares"


@pytest.mark.parametrize("stage", list(NOTEBOOKS))
def test_help_notebook_lists_every_parameter_with_its_comment(stage):
    import papermill

    inferred = papermill.inspect_notebook(str(NOTEBOOKS[stage]))  # what `papermill --help-notebook` prints
    comments = config.field_comments(config.stage_config_class(stage))
    for f in dataclasses.fields(config.stage_config_class(stage)):
        assert f.name in inferred
        assert inferred[f.name]["help"] == comments[f.name] and comments[f.name], f.name


@pytest.mark.slow
def test_nbval_fails_on_a_planted_regression(tmp_path):
    """nbval must compare the summary cell: change one stored number and the run must fail (and pass unchanged)."""
    import subprocess
    import sys

    nb = nbformat.read(NOTEBOOKS["data"], as_version=4)
    checked = [c for c in nb.cells if "NBVAL_CHECK_OUTPUT" in c.source][0]
    text = checked.outputs[0]["data"]["text/plain"]
    assert "'n_train_pairs': " in text
    params = parameters_cell(NOTEBOOKS["data"])
    cell = [c for c in nb.cells if c.source == params.source][0]

    def write(name: str) -> None:  # each copy in a run folder of its own: the notebooks never overwrite a run
        cell.source = params.source.replace(
            "outputs_dir: str = ''", f"outputs_dir: str = {str(tmp_path / name / 'outputs')!r}"
        )
        assert cell.source != params.source
        nbformat.write(nb, tmp_path / f"{name}.ipynb")

    write("same")
    checked.outputs[0]["data"]["text/plain"] = text.replace("'n_train_pairs': ", "'n_train_pairs': 1")
    write("planted")
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "--nbval-lax",
        "-p",
        "no:cacheprovider",
        "--nbval-sanitize-with",
        str(ROOT / "notebooks" / "nbval_sanitize.cfg"),
    ]
    same = subprocess.run(args + [str(tmp_path / "same.ipynb")], cwd=tmp_path, capture_output=True, text=True)
    planted = subprocess.run(args + [str(tmp_path / "planted.ipynb")], cwd=tmp_path, capture_output=True, text=True)
    assert same.returncode == 0, same.stdout[-2000:]
    assert planted.returncode != 0 and "n_train_pairs" in planted.stdout, planted.stdout[-2000:]
