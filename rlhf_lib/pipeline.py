"""Run the stage notebooks in order with papermill: ``python -m rlhf_lib.pipeline --params params/default.yaml``.

Each notebook gets ``common`` + its own section of the params file injected after its parameters cell; executed
notebooks land in ``outputs/<run>/notebooks/`` (a failed one beside it as ``<name>.failed.ipynb``, never over the
copy of a finished stage). ``make pipeline PARAMS=... RUN=...`` calls this.

The pipeline holds the run's lock for the whole invocation and hands its kernels the lock token
(:mod:`rlhf_lib.core.runlock`), so a second writer of the same run is refused at once. The outputs folder is checked
writable before any stage starts. Every fault ends in one line on stderr (:mod:`rlhf_lib.core.cli`): exit 2 for bad
input or an unusable outputs folder, 1 for a failed stage, 130 / 143 for Ctrl-C / SIGTERM (the stage is recorded as
interrupted; ``--skip-done`` resumes it). ``--in-process`` runs the PPO
stage in this process instead of a notebook: what ``accelerate launch`` needs, where every process runs the PPO loop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from rlhf_lib import TEXT_PROGRESS_ENV
from rlhf_lib.core import cli, runlock, runs
from rlhf_lib.core.config import (
    NOTEBOOKS,
    STAGES,
    CommonConfig,
    ConfigError,
    load_params_file,
    stage_parameters,
    validate,
)
from rlhf_lib.core.io import repo_root
from rlhf_lib.core.runs import Run, run_for, shared_stage_refusal

NO_SPACE = "No space left on device"  # how ENOSPC reads in an error line (OSError, safetensors, torch.save)


class StageFailed(RuntimeError):
    """A stage notebook raised; the run records the stage as failed."""


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (value parsed as YAML, so 0.1 / true / [a, b] keep their types)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. ppo.kl_coef=0.1")
    lhs, value = text.split("=", 1)
    section, key = lhs.split(".", 1)
    return section, key, yaml.safe_load(value)


def load(params_path: str, run: str | None, overrides: Sequence[str], overwrite: bool) -> tuple[dict, CommonConfig]:
    """The params file with overrides applied and ``outputs_dir`` made absolute, and its validated common section.

    A relative ``outputs_dir`` is resolved here, once, against the directory the pipeline was started from: the
    kernels run in notebooks/ and receive the absolute path.
    """
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
    if params["common"].get("outputs_dir"):
        params["common"]["outputs_dir"] = os.path.abspath(os.path.expanduser(params["common"]["outputs_dir"]))
    common = validate(CommonConfig, params["common"], f"{params_path} [common]")
    run_for(common)  # a bad run name fails here, before anything runs
    return params, common


def plan(
    params_path: str, run: str | None, stages: Sequence[str], overrides: Sequence[str], overwrite: bool, skip_done: bool
) -> list[tuple[str, dict[str, Any]]]:
    """Validate everything before running anything: returns [(stage, parameters)] for the stages to execute."""
    params, common = load(params_path, run, overrides, overwrite)
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
        parameters = stage_parameters(params, stage)
        _plan_resume(target, stage, parameters, skip_done and not common.overwrite)
        todo.append((stage, parameters))
    return todo


def _plan_resume(target: Run, stage: str, parameters: dict[str, Any], skip_done: bool) -> None:
    """--skip-done continues an interrupted or failed PPO stage from its last checkpoint; resume params are checked."""
    state = target.stage_state(stage)
    if stage == "ppo" and state in ("interrupted", "failed"):
        from rlhf_lib.ppo.checkpoints import latest_checkpoint

        checkpoint = latest_checkpoint(target.checkpoints_dir)
        if checkpoint is not None and skip_done and not parameters.get("resume"):
            parameters["resume"] = True
            print(f"[pipeline] ppo: {runs.describe_state(target, stage)}; resuming from {checkpoint} (--skip-done)")
        elif checkpoint is not None and not parameters.get("resume"):
            print(
                f"[pipeline] ppo: {runs.describe_state(target, stage)}; starting over (--skip-done or "
                f"-p ppo.resume=true would continue from {checkpoint})"
            )
    if parameters.get("resume"):
        runs.check_resume(target, stage, parameters)


def execute(
    params_path: str,
    run: str | None = None,
    stages: Sequence[str] = STAGES,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    skip_done: bool = False,
    kernel_name: str = "python3",
    in_process: bool = False,
) -> Path:
    """Take the run's lock, then plan and execute the notebooks; returns the run folder. Stops at the first failure.

    Raises ConfigError / StageError / RunBusyError / cli.OutputsError before anything runs, StageFailed when a
    stage raised, KeyboardInterrupt (cli.Interrupted under cli.interrupts_raise) with ``.stage`` set when
    interrupted.
    """
    _, common = load(params_path, run, overrides, overwrite)
    target = run_for(common)
    if runs.process_rank() == 0:
        check_outputs(target)
    new_run = not target.root.exists()
    lock = (
        runlock.acquire(target.root, "pipeline", what=f"pipeline {','.join(stages)}")
        if runs.process_rank() == 0
        else None
    )
    try:
        if lock is not None:
            runs.recover_interrupted(target)
        todo = plan(params_path, run, stages, overrides, overwrite, skip_done)
        for stage, _ in todo:  # a missing or unfinished base run is refused before any stage starts
            runs.check_upstream(common, target, stage)
        token = lock.info.get("token", "") if lock is not None else os.environ.get(runlock.LOCK_ENV, "")
        with runlock.environ(TEXT_PROGRESS_ENV, "1"), runlock.environ(runlock.LOCK_ENV, token):  # kernels inherit both
            for stage, parameters in todo:
                try:
                    if in_process:
                        _run_in_process(target, stage, parameters)
                    else:
                        _run_notebook(target, stage, parameters, kernel_name)
                except KeyboardInterrupt as err:  # the stage is recorded as interrupted; say which one
                    err.stage, err.run = stage, target.root
                    err.stage_done = target.stage_status(stage) == "done"  # it finished before the signal landed
                    raise
    finally:
        if lock is not None:
            lock.release("pipeline")
            if new_run:  # refused before anything ran: leave no run folder holding only its lock file
                with contextlib.suppress(OSError):
                    if [p.name for p in target.root.iterdir()] == [runlock.LOCK_NAME]:
                        (target.root / runlock.LOCK_NAME).unlink()
                        target.root.rmdir()
    if runs.process_rank() == 0:
        print(
            f"[pipeline] outputs in {target.root} (summary.json, manifest.json, plots/, notebooks/)"
            if todo
            else "[pipeline] nothing to run"
        )
    return target.root


def check_outputs(target: Run) -> None:
    """Refuse (cli.OutputsError) an outputs or run folder that cannot be written, before any stage starts."""
    cli.check_writable(target.root.parent)
    if target.root.exists():
        cli.check_writable(target.root, what=f"run folder of {target.name!r}")
        staging = target.root / runs.STAGING
        if staging.is_dir():
            cli.check_writable(staging, what=f"staging folder of {target.name!r}")


def _failure_line(message: str, target: Run) -> str:
    """A stage's first error line; a full disk also names the run folder and the space left there."""
    line = runs.first_line(message)
    if NO_SPACE in line:
        line += f" (the disk holding {target.root} has {cli.free_space(target.root)}; free some space)"
    return line


def _run_notebook(target: Run, stage: str, parameters: dict[str, Any], kernel_name: str) -> None:
    """Execute one stage notebook into a temp file; keep it as the run's copy only when the stage finished."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    target.notebooks_dir.mkdir(parents=True, exist_ok=True)
    notebook = NOTEBOOKS[stage]
    final = target.notebooks_dir / notebook
    tmp, failed = final.with_suffix(".running.ipynb"), final.with_suffix(".failed.ipynb")
    print(f"[pipeline] {stage}: running notebooks/{notebook} -> {final}", flush=True)
    start = time.time()
    try:
        with cli.forward_interrupts():
            _execute(papermill, notebook, tmp, parameters, kernel_name)
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt) and target.stage_status(stage) == "done" and tmp.exists():
            os.replace(tmp, final)  # the stage finished as the signal came: its notebook is the run's copy
            failed.unlink(missing_ok=True)
            raise
        if tmp.exists():
            os.replace(tmp, failed)
        if not isinstance(err, Exception):  # Ctrl-C / SIGTERM: stop as the user asked, the stage resumable
            runs.fail_stage(target, stage, err if isinstance(err, KeyboardInterrupt) else KeyboardInterrupt())
            raise
        message = f"{err.ename}: {err.evalue}" if isinstance(err, PapermillExecutionError) else runs.first_line(err)
        if target.stage_state(stage) == "interrupted":  # the kernel ended before recording its failure
            runs.fail_stage(target, stage, message)
        raise StageFailed(
            f"stage {stage!r} failed: {_failure_line(message, target)} (executed notebook with the traceback: {failed})"
        ) from err
    os.replace(tmp, final)
    failed.unlink(missing_ok=True)
    print(f"[pipeline] {stage}: done in {time.time() - start:.0f} s", flush=True)


def _execute(papermill, notebook: str, out: Path, parameters: dict[str, Any], kernel_name: str) -> None:
    """papermill on one stage notebook (its kernel's pid kept for interrupts)."""
    root = repo_root()
    papermill.execute_notebook(
        str(root / "notebooks" / notebook),
        str(out),
        **cli.kernel_options(),
        parameters=parameters,
        kernel_name=kernel_name,
        cwd=str(root / "notebooks"),
        # the kernel's stdout/stderr go straight to this console, so the stages' progress bars and prints show
        # live (the executed notebook keeps its own copy of every output)
        stdout_file=sys.stdout,
        stderr_file=sys.stderr,
        progress_bar=False,
    )


def _run_in_process(target: Run, stage: str, parameters: dict[str, Any]) -> None:
    """The PPO notebook's calls, in this process (every process of an ``accelerate launch`` runs this)."""
    if stage != "ppo":
        raise ConfigError(
            f"--in-process runs the ppo stage only (got {stage!r}); run the other stages as "
            f"notebooks (without --in-process)"
        )
    from rlhf_lib.ppo.trainer import PPOConfig, train_ppo

    cfg = validate(PPOConfig, parameters, "parameters of stage 'ppo'")
    run = runs.start_stage(cfg, "ppo")
    print(f"[pipeline] ppo: in process (rank {runs.process_rank()}) -> {target.root}", flush=True)
    try:
        result = train_ppo(cfg, run)
    except BaseException as err:
        runs.fail_stage(run, "ppo", err)
        if not isinstance(err, Exception):
            raise
        raise StageFailed(f"stage 'ppo' failed: {_failure_line(runs.first_line(err), target)}") from err
    runs.finish_stage(run, "ppo", result.summary)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/default.yaml", help="params profile (YAML)")
    parser.add_argument("--run", default=None, help="run name (default: the profile's common.run)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument(
        "-p",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override one parameter: section.key=value (repeatable)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="redo stages this run already finished (replaced only when the new attempt finishes)",
    )
    parser.add_argument(
        "--skip-done",
        action="store_true",
        help="skip finished stages; continue an interrupted or failed PPO stage from its last checkpoint",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the ppo stage in this process, not as a notebook (for accelerate launch)",
    )
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        with cli.interrupts_raise():
            execute(
                args.params,
                args.run,
                stages,
                args.overrides,
                args.overwrite,
                args.skip_done,
                in_process=args.in_process,
            )
    except KeyboardInterrupt as err:
        if runs.process_rank() == 0:
            print(interrupted_line(err), file=sys.stderr, flush=True)
        return cli.interrupt_status(err)
    except (ConfigError, runs.StageError, runlock.RunBusyError, cli.OutputsError) as err:
        return cli.error(str(err))
    except OSError as err:  # a write failed outside any stage (the run's manifest, its lock, a notebook copy)
        return cli.error(cli.os_error_line(err))
    except StageFailed as err:
        cli.error(str(err))
        # a full disk is an unusable outputs folder, not a fault of the stage
        return cli.EXIT_ERROR if NO_SPACE in str(err) else cli.EXIT_FAILED
    return 0


def interrupted_line(err: BaseException) -> str:
    """'interrupted during stage 'ppo' (<run folder>); resume with --skip-done' (or before any stage started)."""
    stage = getattr(err, "stage", None)
    if stage is None:
        return "interrupted outside any stage; re-run with --skip-done to continue"
    if getattr(err, "stage_done", False):
        return f"interrupted after stage {stage!r} finished ({getattr(err, 'run', '?')}); --skip-done runs the rest"
    return f"interrupted during stage {stage!r} ({getattr(err, 'run', '?')}); resume with --skip-done"


if __name__ == "__main__":
    sys.exit(main())
