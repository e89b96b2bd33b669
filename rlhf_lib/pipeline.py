"""Run the stage notebooks in order with papermill: ``python -m rlhf_lib.pipeline --params params/default.yaml``.

Each notebook gets ``common`` + its own section of the params file injected after its parameters cell; executed
notebooks land in ``outputs/<run>/notebooks/``. ``make pipeline PARAMS=... RUN=...`` calls this.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import TEXT_PROGRESS_ENV
from .config import NOTEBOOKS, STAGES, CommonConfig, ConfigError, load_params_file, stage_parameters, validate
from .runs import repo_root, run_for, shared_stage_refusal


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (value parsed as YAML, so 0.1 / true / [a, b] keep their types)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. ppo.kl_coef=0.1")
    lhs, value = text.split("=", 1)
    section, key = lhs.split(".", 1)
    return section, key, yaml.safe_load(value)


def plan(params_path: str, run: str | None, stages: Sequence[str], overrides: Sequence[str], overwrite: bool,
         skip_done: bool) -> list[tuple[str, dict[str, Any]]]:
    """Validate everything before running anything: returns [(stage, parameters)] for the stages to execute."""
    params = load_params_file(params_path)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in params:
            raise ConfigError(f"override {text!r}: unknown section {section!r}")
        params[section][key] = value
    if run:
        params["common"]["run"] = run
    if overwrite:
        params["common"]["overwrite"] = True
    common = validate(CommonConfig, params["common"], f"{params_path} [common]")
    target = run_for(common)
    todo = []
    for stage in stages:
        refusal = shared_stage_refusal(common, stage)  # common.base_run: data + reward_model are read, never run
        if refusal:
            raise ConfigError(refusal)
        status = target.stage_status(stage)
        if status == "done" and not common.overwrite:
            if skip_done:
                print(f"[pipeline] {stage}: already done in {target.root}, skipped (--skip-done)")
                continue
            raise ConfigError(
                f"run {target.name!r} ({target.root}) already finished stage {stage!r}. Choose another run name "
                f"(make pipeline RUN=<name>), resume the unfinished stages with --skip-done, or redo with --overwrite."
            )
        todo.append((stage, stage_parameters(params, stage)))
    return todo


def execute(params_path: str, run: str | None = None, stages: Sequence[str] = STAGES, overrides: Sequence[str] = (),
            overwrite: bool = False, skip_done: bool = False, kernel_name: str = "python3") -> Path:
    """Execute the planned notebooks; returns the run folder. Stops at the first failing stage."""
    todo = plan(params_path, run, stages, overrides, overwrite, skip_done)
    root = repo_root()
    previous = os.environ.get(TEXT_PROGRESS_ENV)
    os.environ[TEXT_PROGRESS_ENV] = "1"  # kernels inherit it: text progress bars (rlhf_lib/__init__.py)
    try:
        out_root = _run_notebooks(todo, root, kernel_name)
    finally:
        if previous is None:
            os.environ.pop(TEXT_PROGRESS_ENV, None)
        else:
            os.environ[TEXT_PROGRESS_ENV] = previous
    if out_root is None:
        print("[pipeline] nothing to run")
    else:
        print(f"[pipeline] outputs in {out_root} (summary.json, manifest.json, plots/, notebooks/)")
    return out_root


def _run_notebooks(todo: Sequence[tuple[str, dict[str, Any]]], root: Path, kernel_name: str) -> Path | None:
    import papermill

    out_root = None
    for stage, parameters in todo:
        target = run_for(validate(CommonConfig, {k: v for k, v in parameters.items() if k in CommonConfig.__dataclass_fields__}, "run"))
        out_root = target.root
        target.notebooks_dir.mkdir(parents=True, exist_ok=True)
        notebook = NOTEBOOKS[stage]
        print(f"[pipeline] {stage}: running notebooks/{notebook} -> {target.notebooks_dir / notebook}", flush=True)
        start = time.time()
        papermill.execute_notebook(
            str(root / "notebooks" / notebook),
            str(target.notebooks_dir / notebook),
            parameters=parameters,
            kernel_name=kernel_name,
            cwd=str(root / "notebooks"),
            # the kernel's stdout/stderr go straight to this console, so the stages' progress bars and prints show
            # live (the executed notebook keeps its own copy of every output)
            stdout_file=sys.stdout,
            stderr_file=sys.stderr,
            progress_bar=False,
        )
        print(f"[pipeline] {stage}: done in {time.time() - start:.0f} s", flush=True)
    return out_root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/default.yaml", help="params profile (YAML)")
    parser.add_argument("--run", default=None, help="run name (default: the profile's common.run)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("-p", "--set", dest="overrides", action="append", default=[],
                        help="override one parameter: section.key=value (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="redo stages this run already finished")
    parser.add_argument("--skip-done", action="store_true", help="skip stages this run already finished")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        execute(args.params, args.run, stages, args.overrides, args.overwrite, args.skip_done)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
