"""Seeds and parameter sweeps over shared upstream stages: ``python -m rlhf_lib.sweeps params/sweeps/<name>.yaml``.

A sweep file names a base params profile, a base run and a grid over any params keys::

    params: params/default.yaml      # base profile (relative to the repo root, or absolute)
    base_run: build                  # build: point 0 builds data + reward_model in outputs/<sweep>/base;
                                     # "": none (every point runs its own stages); else an existing run (a name
                                     # under the outputs folder, or an absolute run folder)
    overrides: {ppo.total_episodes: 512}          # applied to every point (and to a built base)
    grid: {common.seed: [0, 1, 2], ppo.kl_coef: [0.02, 0.05, 0.1, 0.2]}
    seed_key: common.seed            # the key aggregated over (default common.seed)
    stages: [ppo, eval]              # default: ppo, eval with a base run; all four without
    reuse: [other_sweep]             # sweeps beside this one whose finished points stand in for identical points
    headline: true                   # this sweep's summary is the README headline's source (one shipped sweep)

Each point is an ordinary run folder ``<outputs>/<sweep>/<point>/`` (``common.outputs_dir`` of the points is the
sweep folder, and a built base is the run ``base`` there), produced by the pipeline command
:func:`point_command` prints, so a job array can run the points (``--print-commands``, ``--point N``). Finished
stages are skipped, a killed stage is redone from scratch (its folders are cleared by ``runs.start_stage``), and a
finished point is never touched. A point whose folder does not exist yet is taken from a ``reuse`` sweep's finished
run when that run's recorded parameters equal the point's in every stage (so a grid can be extended around points
another sweep already ran; the reused folder is only read). :func:`aggregate` then writes
``<outputs>/<sweep>/summary.json``: every point, per grid cell (all overrides but the seed) mean, std and a
Student-t 95 % interval over seeds of every numeric summary key, and a fit of Gao et al. (2022)'s RL
over-optimisation form to the KL-gold frontier. ``--merge <summary.json>`` adds the finished points of an earlier
summary of the same sweep that have no folder here (points run on other machines, or a committed
``docs/sweeps/<name>/summary.json`` whose run folders are gone): each keeps its recorded commit and run folder and
says where it was merged from.

A point that fails (a stage raised, or the pipeline refused it: bad params, a run another process writes, a folder
it cannot write) is reported at once on stderr with its run folder and the sweep goes on; points that read a built
base that failed are skipped. At the end the failed and skipped points are listed, what finished is aggregated (the
notebook waits for a sweep with no failure) and the exit status is 1; a re-run redoes only the unfinished points.
One process runs a whole sweep at a time (it holds the lock of the sweep folder; ``--point N`` takes only the
point's own run lock, so a job array runs points side by side). Ctrl-C / SIGTERM stop the sweep with one line
naming the point it was in (exit 130 / 143).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import yaml

from rlhf_lib.core import cli, runlock
from rlhf_lib.core.config import STAGES, CommonConfig, ConfigError, load_params_file, stage_parameters, validate
from rlhf_lib.core.io import repo_root, write_json_atomic
from rlhf_lib.core.runs import (
    SHARED_STAGES,
    Run,
    StageError,
    base_stage_hashes,
    first_line,
    outputs_root,
    read_json,
)
from rlhf_lib.pipeline import NO_SPACE, StageFailed
from rlhf_lib.sweeps.stats import (
    finite,
    fit_frontier,
    frontier_rows,
    group_points,
    mark_mixed_bases,
    select_default,
)

SWEEP_KEYS = ("name", "params", "base_run", "stages", "overrides", "grid", "seed_key", "reuse", "headline")
MANAGED_KEYS = ("common.run", "common.outputs_dir", "common.base_run", "common.overwrite")  # set per point
# Parameters a finished point may have run with differently (where it ran, not what it computed; a point reused
# from another sweep has its name there).
UNCHECKED_KEYS = ("run", "outputs_dir", "overwrite", "threads", "device")
BASE_NAME = "base"
NOTEBOOK = "05_sweep.ipynb"


class SweepError(ValueError):
    """A sweep file is invalid, or a finished point disagrees with the sweep file."""


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its index (0 = a built base), run name, grid values and the stages it runs."""

    index: int
    name: str
    overrides: dict[str, Any]
    stages: tuple[str, ...]
    is_base: bool = False


@dataclass
class Sweep:
    """A parsed sweep file; ``root`` is ``<outputs>/<name>``, holding the points, summary.json, plots/, notebooks/."""

    name: str
    params: str
    root: Path
    base_run: str = "build"
    stages: tuple[str, ...] = ("ppo", "eval")
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seed_key: str = "common.seed"
    reuse: tuple[str, ...] = ()  # sweeps (folders beside this one) whose finished points stand in for identical ones
    threads: int | None = None  # common.threads of every point, from --threads (where it runs, not what it computes)
    headline: bool = False  # the summary is marked ``headline: true``: the README headline is read from it

    @property
    def params_path(self) -> Path:
        path = Path(self.params).expanduser()
        return path if path.is_absolute() else repo_root() / path

    @property
    def base_ref(self) -> str:
        """common.base_run of the grid points: "base" (the built base, a sibling), an absolute folder, or ""."""
        if self.base_run == "build":
            return BASE_NAME
        if not self.base_run:
            return ""
        path = Path(self.base_run).expanduser()
        return str(path if path.is_absolute() else self.root.parent / self.base_run)

    def points(self) -> list[Point]:
        out = [Point(0, BASE_NAME, {}, tuple(SHARED_STAGES), True)] if self.base_run == "build" else []
        keys = list(self.grid)
        for values in itertools.product(*(self.grid[k] for k in keys)):
            combo = dict(zip(keys, values))
            out.append(Point(len(out), point_name(combo, keys), combo, self.stages))
        return out

    def grid_points(self) -> list[Point]:
        return [p for p in self.points() if not p.is_base]


def _short(key: str, keys: Sequence[str]) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def point_name(combo: dict[str, Any], keys: Sequence[str]) -> str:
    """Run name of a grid point, e.g. ``seed0-kl_coef0.05`` (the full key where two keys share a last part)."""
    parts = [f"{_short(k, keys)}{v}" for k, v in combo.items()]
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", "-".join(parts)) or "point"


# ----------------------------------------------------------------------------------------------------------------
# loading and checking a sweep file


def load_sweep(path: str | Path, outputs_dir: str | None = None) -> Sweep:
    """Read and validate a sweep file; every point's params are validated before anything runs."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"sweep file {path} does not exist (sweeps live in params/sweeps/*.yaml)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = [k for k in raw if k not in SWEEP_KEYS] if isinstance(raw, dict) else ["<not a mapping>"]
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown}; valid keys: {', '.join(SWEEP_KEYS)}")
    name = str(raw.get("name") or path.stem)
    if "/" in name or name in (".", "..", BASE_NAME):
        raise SweepError(f"{path}: name {name!r} must be a plain folder name other than {BASE_NAME!r}")
    if "params" not in raw:
        raise SweepError(f"{path}: missing key 'params' (the base profile, e.g. params: params/default.yaml)")
    base_run = str(raw.get("base_run", "build") or "")  # absent: build; "" / null: none
    default_stages = ("ppo", "eval") if base_run else STAGES
    stages = tuple(raw.get("stages") or default_stages)
    grid = dict(raw.get("grid") or {})
    sweep = Sweep(
        name,
        str(raw["params"]),
        Path(),
        base_run,
        stages,
        dict(raw.get("overrides") or {}),
        grid,
        str(raw.get("seed_key", "common.seed")),
        _reuse_names(raw.get("reuse"), path, name),
        headline=_flag(raw.get("headline", False), path, "headline"),
    )
    params = load_params_file(sweep.params_path)
    common = validate(CommonConfig, params["common"], f"{sweep.params_path} [common]")
    root = Path(outputs_dir).expanduser() if outputs_dir else outputs_root(common)
    sweep.root = root.resolve() / name
    _check_sweep(sweep, path)
    for point in sweep.points():
        point_params(sweep, point)  # raises ConfigError naming the point and key
    return sweep


def _flag(value: Any, path: Path, key: str) -> bool:
    if not isinstance(value, bool):
        raise SweepError(f"{path}: {key} is {value!r}; write {key}: true or {key}: false")
    return value


def _reuse_names(value: Any, path: Path, name: str) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else list(value or [])
    bad = [n for n in names if not isinstance(n, str) or not n or "/" in n or n in (".", "..", name)]
    if bad:
        raise SweepError(
            f"{path}: reuse {bad!r}: give the names of other sweeps (folders beside this one), "
            "e.g. reuse: [eos_penalty]"
        )
    return tuple(names)


def _check_sweep(sweep: Sweep, path: Path) -> None:
    bad_stages = [s for s in sweep.stages if s not in STAGES]
    if bad_stages:
        raise SweepError(f"{path}: stages {bad_stages} unknown; choose from {', '.join(STAGES)}")
    if sweep.base_run and set(sweep.stages) & set(SHARED_STAGES):
        raise SweepError(
            f"{path}: stages {list(sweep.stages)} include a stage read from the base run "
            f"({', '.join(SHARED_STAGES)}); use stages: [ppo, eval], or base_run: '' to run them "
            "per point"
        )
    for key, values in sweep.grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid key {key!r} needs a non-empty list of values, e.g. {key}: [0, 1, 2]")
    for key in [*sweep.grid, *sweep.overrides]:
        section = key.split(".", 1)[0]
        if "." not in key or (section != "common" and section not in STAGES):
            raise SweepError(f"{path}: key {key!r} must be section.key with section common or one of {STAGES}")
        if key in MANAGED_KEYS:
            raise SweepError(f"{path}: key {key!r} is set by the sweep for each point; remove it")
        if sweep.base_run and section in SHARED_STAGES and key in sweep.grid:
            raise SweepError(
                f"{path}: grid key {key!r} varies a stage read from the base run; set base_run: '' "
                "so that every point runs its own data + reward_model"
            )
    names = [p.name for p in sweep.grid_points()]
    if len(set(names)) != len(names):
        raise SweepError(f"{path}: grid values give duplicate point names {names}; make values distinct")


def point_overrides(sweep: Sweep, point: Point) -> list[str]:
    """The pipeline's ``section.key=value`` overrides of a point (values as JSON, which YAML reads back)."""
    values = {**sweep.overrides, **point.overrides, "common.outputs_dir": str(sweep.root)}
    if not point.is_base and sweep.base_ref:
        values["common.base_run"] = sweep.base_ref
    if sweep.threads:
        values["common.threads"] = sweep.threads
    return [f"{k}={_yaml_text(v)}" for k, v in values.items()]


def _yaml_text(value: Any) -> str:
    """``value`` as text that YAML reads back as the same value (plain where it can be, else JSON)."""
    return value if isinstance(value, str) and value and yaml.safe_load(value) == value else json.dumps(value)


def point_params(sweep: Sweep, point: Point) -> dict[str, dict[str, Any]]:
    """The point's resolved parameters per stage it runs (validated; ConfigError names the point)."""
    params = load_params_file(sweep.params_path)
    for text in point_overrides(sweep, point):
        lhs, value = text.split("=", 1)
        section, key = lhs.split(".", 1)
        params[section][key] = yaml.safe_load(value)
    params["common"]["run"] = point.name
    try:
        return {stage: stage_parameters(params, stage) for stage in point.stages}
    except ConfigError as err:
        raise ConfigError(f"sweep {sweep.name!r} point {point.index} ({point.name}): {err}") from None


def point_command(sweep: Sweep, point: Point) -> str:
    """A self-contained shell command (run from the repo root) that produces this point's run folder."""
    args = [
        "python",
        "-m",
        "rlhf_lib.pipeline",
        "--params",
        sweep.params,
        "--run",
        point.name,
        "--stages",
        ",".join(point.stages),
        "--skip-done",
    ]
    for text in point_overrides(sweep, point):
        args += ["-p", text]
    return " ".join(shlex.quote(a) for a in args)


# ----------------------------------------------------------------------------------------------------------------
# running points


def point_run(sweep: Sweep, point: Point) -> Run:
    """The point's own folder; where it has none yet, an identical finished run of a ``reuse`` sweep if there is one."""
    own = Run(sweep.root / point.name)
    if own.manifest_path.exists() or point.is_base or not sweep.reuse:
        return own
    return reused_run(sweep, point) or own


def reused_run(sweep: Sweep, point: Point) -> Run | None:
    """A finished run of a ``reuse`` sweep that ran every stage of the point with the point's parameters."""
    planned = point_params(sweep, point)
    for name in sweep.reuse:
        for manifest in sorted((sweep.root.parent / name).glob("*/manifest.json")):
            stages = read_json(manifest, {}).get("stages", {})
            if all(
                stages.get(stage, {}).get("status") == "done"
                and not differing_keys(stages[stage].get("params") or {}, planned[stage], missing_differs=True)
                for stage in point.stages
            ):
                return Run(manifest.parent)
    return None


def differing_keys(recorded: dict[str, Any], planned: dict[str, Any], missing_differs: bool) -> list[str]:
    """Keys of ``planned`` (but UNCHECKED_KEYS) whose recorded value differs; a key the record lacks counts as
    differing only when ``missing_differs`` (a run made before the key existed may resume, not stand in)."""
    return [
        k
        for k, v in planned.items()
        if k not in UNCHECKED_KEYS and (recorded[k] != v if k in recorded else missing_differs)
    ]


def reused_from(sweep: Sweep, point: Point) -> str:
    """``<sweep>/<run>`` of the run reused for the point, or "" when the point's run is its own."""
    where = point_run(sweep, point).root
    return f"{where.parent.name}/{where.name}" if where.parent != sweep.root else ""


def point_status(sweep: Sweep, point: Point) -> str:
    """done (every stage of the point done), pending (nothing yet), or the first unfinished stage's status."""
    run = point_run(sweep, point)
    if not run.manifest_path.exists():
        return "pending"
    for stage in point.stages:
        status = run.stage_status(stage)
        if status != "done":
            return f"{stage} {status or 'pending'}"
    return "done"


def check_recorded_params(sweep: Sweep, point: Point) -> None:
    """Refuse a point whose finished stages ran with other values than the sweep file now gives."""
    stages = point_run(sweep, point).manifest().get("stages", {})
    planned = point_params(sweep, point)
    for stage, info in stages.items():
        if info.get("status") != "done" or stage not in planned:
            continue
        recorded = info.get("params") or {}
        for key in differing_keys(recorded, planned[stage], missing_differs=False)[:1]:
            raise SweepError(
                f"point {point.name} ({point_run(sweep, point).root}) finished stage {stage!r} with {key}="
                f"{recorded[key]!r} but the sweep now gives {planned[stage][key]!r}; use a new sweep name to run "
                "the new values"
            )


def run_point(sweep: Sweep, point: Point, kernel_name: str = "python3") -> float | None:
    """Run the point's unfinished stages through the pipeline; returns its seconds, or None when already done."""
    from rlhf_lib import pipeline

    check_recorded_params(sweep, point)
    if point_status(sweep, point) == "done":
        return None
    if not point.is_base and sweep.base_ref:
        check_base(sweep)
    start = time.time()
    pipeline.execute(
        str(sweep.params_path),
        run=point.name,
        stages=point.stages,
        overrides=point_overrides(sweep, point),
        skip_done=True,
        kernel_name=kernel_name,
    )
    seconds = time.time() - start
    # in the sweep folder, not the point's: a finished point's folder is never written again
    write_json_atomic(sweep.root / "timings" / f"{point.name}.json", {"seconds": seconds})
    return seconds


def check_base(sweep: Sweep) -> None:
    """Refuse to start a point before the base run's shared stages are done (say which is not)."""
    base = Run(sweep.root / sweep.base_ref)  # a relative name is a sibling in the sweep folder
    for stage in SHARED_STAGES:
        status = base.stage_status(stage)
        if status != "done":
            hint = "run --point 0 first" if sweep.base_run == "build" else "finish it there"
            raise SweepError(
                f"sweep {sweep.name!r}: stage {stage!r} of base run {base.root} is {status or 'missing'}, "
                f"not done; {hint}"
            )


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass(frozen=True)
class PointFailure:
    """A point that did not finish in this invocation: its run folder, the first line of why, and the exit status
    it gives on its own (``--point N``): 1 a stage failed, 2 the point was refused or its folder is unusable."""

    point: Point
    folder: Path
    line: str
    status: int = cli.EXIT_FAILED
    skipped: bool = False  # not run: it reads a built base that failed


# what a point's run raises for that point alone; the sweep reports it and goes on with the other points
POINT_ERRORS = (StageFailed, ConfigError, StageError, runlock.RunBusyError, OSError)


def point_failure(sweep: Sweep, point: Point, err: Exception) -> PointFailure:
    """The failure record of ``point`` for ``err`` (one of POINT_ERRORS), reported at once on stderr."""
    folder = point_run(sweep, point).root
    if isinstance(err, OSError) and not isinstance(err, cli.OutputsError):
        line = cli.os_error_line(err, folder)
    else:
        line = first_line(str(err)) or type(err).__name__
    stage_failed = isinstance(err, StageFailed) and NO_SPACE not in line  # a full disk is no fault of the stage
    failure = PointFailure(point, folder, line, cli.EXIT_FAILED if stage_failed else cli.EXIT_ERROR)
    print(f"error: sweep point {point.name!r} ({folder}): {line}", file=sys.stderr, flush=True)
    return failure


def run_sweep(sweep: Sweep, points: Sequence[Point] | None = None, kernel_name: str = "python3") -> list[PointFailure]:
    """Run points in order (a built base first), one progress line per point: index/total, name, elapsed, ETA.

    A point that fails is reported at once and the others go on; the points that read a built base that failed
    are skipped. Returns the failed and skipped points. An interrupt (KeyboardInterrupt, cli.Interrupted) stops
    the sweep; it propagates with ``sweep_point`` set to the point it stopped and that point's run folder.
    """
    points = list(sweep.points() if points is None else points)
    total, start, durations, failures = len(sweep.points()), time.time(), [], []

    def eta(rest: Sequence[Point]) -> str:
        left = sum(1 for p in rest if not p.is_base and point_status(sweep, p) != "done")
        return f"elapsed {_clock(time.time() - start)}, ETA {_clock(np.mean(durations) * left if durations else None)}"

    for k, point in enumerate(points):
        label = f"[sweep] {point.index + 1}/{total} {point.name}"
        status = point_status(sweep, point)
        if status == "done":
            reused = reused_from(sweep, point)
            print(f"{label}: already done{f' (in {reused})' if reused else ''}, skipped", flush=True)
            continue
        base = next((f.point.name for f in failures if f.point.is_base), None)
        if base is not None:  # every other point of a sweep that builds its base reads that base
            line = f"not run: it reads the base point {base!r}, which failed"
            print(f"{label}: {line}", flush=True)
            failures.append(PointFailure(point, point_run(sweep, point).root, line, skipped=True))
            continue
        print(f"{label}: running {','.join(point.stages)} ({status}; {eta(points[k:])})", flush=True)
        try:
            seconds = run_point(sweep, point, kernel_name)
        except POINT_ERRORS as err:
            failures.append(point_failure(sweep, point, err))
            print(f"{label}: failed ({eta(points[k + 1 :])})", flush=True)
            continue
        except KeyboardInterrupt as err:  # stop the whole sweep; main says which point it stopped
            err.sweep_point = (point.name, point_run(sweep, point).root)
            raise
        if seconds is not None and not point.is_base:
            durations.append(seconds)
        print(f"{label}: done in {_clock(seconds)} ({eta(points[k + 1 :])})", flush=True)
    return failures


def report_failures(sweep: Sweep, failures: Sequence[PointFailure], total: int) -> None:
    """One ``error:`` line counting the points that did not finish, then one line each: name, folder, why."""
    failed = [f for f in failures if not f.skipped]
    skipped = len(failures) - len(failed)
    cli.error(
        f"sweep {sweep.name!r}: {len(failed)} of {total} points failed"
        + (f", {skipped} not run" if skipped else "")
        + "; fix the cause and re-run the same command (it runs only the unfinished points)"
    )
    for f in failures:
        print(f"  {'skipped' if f.skipped else 'failed'}: {f.point.name} ({f.folder}): {f.line}", file=sys.stderr)
    sys.stderr.flush()


@contextlib.contextmanager
def sweep_lock(sweep: Sweep) -> Iterator[None]:
    """Hold the lock of the sweep folder while a whole sweep runs: a second sweep of it is refused at once."""
    try:
        lock = runlock.acquire(sweep.root, "sweep", what=f"sweep {sweep.name}")
    except runlock.RunBusyError:
        try:
            info = json.loads((sweep.root / runlock.LOCK_NAME).read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        who = runlock.describe_holder(info) if isinstance(info, dict) and info.get("pid") else "another process"
        raise runlock.RunBusyError(
            f"sweep {sweep.name!r} ({sweep.root}) is being run by {who}; wait for it to finish or stop it"
        ) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise cli.OutputsError(cli.os_error_line(err, sweep.root)) from err
        raise cli.OutputsError(
            f"cannot write the sweep folder {sweep.root}: {err.strerror or err}; give a writable folder with "
            "--outputs-dir DIR"
        ) from err
    try:
        yield
    finally:
        lock.release("sweep")


def point_seconds(sweep: Sweep, point: Point) -> float | None:
    """Seconds the point took: as timed by the sweep runner, else its manifest's first start to last end."""
    run = point_run(sweep, point)  # timed in the sweep folder holding it (another's, for a reused point)
    timed = read_json(run.root.parent / "timings" / f"{run.root.name}.json", {}) or {}
    if "seconds" in timed:
        return float(timed["seconds"])
    from datetime import datetime

    stages = run.manifest().get("stages", {})
    starts = [datetime.fromisoformat(s["started"]) for s in stages.values() if s.get("started")]
    ends = [datetime.fromisoformat(s["ended"]) for s in stages.values() if s.get("ended")]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def point_entry(sweep: Sweep, point: Point) -> dict[str, Any]:
    run = point_run(sweep, point)
    status = point_status(sweep, point)
    return {
        "index": point.index,
        "name": point.name,
        "overrides": point.overrides,
        "run_dir": str(run.root),
        "git": run.manifest().get("git"),  # the commit (and dirty flag) the point's stages ran
        "base_stages": base_stage_hashes(run),  # which data and reward model it read, by content
        "status": status,
        "wall_seconds": point_seconds(sweep, point),
        "summary": run.summary(),
    }


def _base_label(base_run: str | None) -> str | None:
    """The base run as ``<sweep>/<run>`` (or the run name): comparable across machines and outputs folders."""
    return "/".join(Path(base_run).parts[-2:]) if base_run else None


def merged_points(sweep: Sweep, path: str | Path) -> dict[str, dict[str, Any]]:
    """Finished points of an earlier summary.json of ``sweep``, by name; refuses a summary of other settings."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"--merge {path}: no such file; give an earlier <outputs>/<sweep>/summary.json")
    earlier = read_json(path, None)
    if not isinstance(earlier, dict) or not isinstance(earlier.get("points"), list):
        raise SweepError(
            f"--merge {path}: not a sweep summary.json (no 'points' list); give <outputs>/<sweep>/summary.json"
        )
    mine = {"sweep": sweep.name, "params": sweep.params, "overrides": sweep.overrides, "seed_key": sweep.seed_key}
    theirs = {k: earlier.get(k) for k in mine}
    mine["base_run"], theirs["base_run"] = _base_label(sweep.base_ref), _base_label(earlier.get("base_run"))
    for key in mine:
        if theirs[key] != mine[key]:
            raise SweepError(
                f"--merge {path}: its {key} is {theirs[key]!r} but sweep {sweep.name!r} has {mine[key]!r}; "
                "merge only a summary of this sweep with the same settings"
            )
    return {
        e["name"]: {**e, "merged_from": str(path)}
        for e in earlier["points"] + [earlier.get("base") or {}]
        if e.get("status") == "done" and "name" in e
    }


def merged_entry(sweep: Sweep, earlier: Sequence[dict[str, dict[str, Any]]], point: Point) -> dict[str, Any] | None:
    """The point's finished entry in the first of ``earlier`` (:func:`merged_points`) with its name and overrides,
    when the point has nothing here (an own or reused run, even unfinished, always wins)."""
    if point_status(sweep, point) != "pending":
        return None
    for found in earlier:
        if point.name in found and (found[point.name].get("overrides") or {}) == point.overrides:
            return found[point.name]
    return None


def aggregate(sweep: Sweep, write: bool = True, merge: Sequence[str | Path] = ()) -> dict[str, Any]:
    """summary.json of the sweep: points, groups (mean/std/t-CI per numeric key), frontier rows and fit, times.

    ``merge``: earlier summary.json files of this sweep; a point with nothing here (status pending) takes its finished
    entry from the first that has one with the same name and overrides."""
    earlier = [merged_points(sweep, path) for path in merge]

    def entry(point: Point) -> dict[str, Any]:
        found = merged_entry(sweep, earlier, point)
        return {**found, "index": point.index} if found else point_entry(sweep, point)

    base = [entry(p) for p in sweep.points() if p.is_base]
    entries = [entry(p) for p in sweep.grid_points()]
    merged = [e["name"] for e in entries + base if e.get("merged_from")]
    if merged:
        print(f"[sweep] {len(merged)} finished points merged from {', '.join(map(str, merge))}", flush=True)
    unfinished = [e["name"] for e in entries + base if e["status"] != "done"]
    if unfinished:
        print(f"[sweep] warning: points not finished, left out of the groups: {', '.join(unfinished)}", flush=True)
    rows = frontier_rows([e for e in entries if e["status"] == "done"], sweep.seed_key)
    gains = [(r["kl"], r["gold_gain"]) for r in rows if r.get("gold_gain") is not None and r.get("kl") is not None]
    groups = group_points(entries, sweep.seed_key)
    for group in mark_mixed_bases(groups, entries):
        print(
            f"[sweep] warning: cell {group['overrides']} mixes {group['bases']} bases (data / reward model by "
            "content): its spread is not seed noise alone; compare it by paired gains",
            flush=True,
        )
    seconds = [e["wall_seconds"] for e in entries + base if e["status"] == "done" and e["wall_seconds"] is not None]
    n_seeds = len(sweep.grid.get(sweep.seed_key, [None]))
    summary = {
        "sweep": sweep.name,
        "params": sweep.params,
        "grid": sweep.grid,
        "overrides": sweep.overrides,
        "seed_key": sweep.seed_key,
        "base_run": sweep.base_ref or None,
        "headline": sweep.headline,
        "interval": "95 % Student t interval over seeds: mean +- t(0.975, n-1) * std / sqrt(n), std with ddof 1",
        "prediction_interval": "95 % prediction interval of one new seed: mean +- t(0.975, n-1) * std * sqrt(1 + 1/n)",
        "points": entries,
        "base": base[0] if base else None,
        "groups": groups,
        "frontier": rows,
        "frontier_fit": fit_frontier(*zip(*gains)) if gains else fit_frontier([], []),
        "complete": not unfinished,
        # the default is chosen only from a finished grid: every cell with every seed
        "selection": select_default(groups, min_seeds=n_seeds)
        if all(g["n_seeds"] >= n_seeds for g in groups)
        else None,
        "wall_seconds": float(sum(seconds)),
        "wall_seconds_note": "sum over the finished base and points of the time each took",
        "merged_from": [str(path) for path in merge],
    }
    if write:
        write_json_atomic(sweep.root / "summary.json", finite(summary))
    return summary


# ----------------------------------------------------------------------------------------------------------------
# command line


def run_notebook(sweep: Sweep, kernel_name: str = "python3") -> Path:
    """Execute notebooks/05_sweep.ipynb on the finished sweep with papermill into <sweep>/notebooks/."""
    import papermill

    out = sweep.root / "notebooks" / NOTEBOOK
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] notebook: notebooks/{NOTEBOOK} -> {out}", flush=True)
    papermill.execute_notebook(
        str(repo_root() / "notebooks" / NOTEBOOK),
        str(out),
        kernel_name=kernel_name,
        parameters={"sweep": sweep.name, "outputs_dir": str(sweep.root.parent)},
        cwd=str(repo_root() / "notebooks"),
        progress_bar=False,
    )
    return out


def print_commands(sweep: Sweep, file=None) -> None:
    """One self-contained pipeline command per point (run from the repo root), with its index and status."""
    file = file or sys.stdout
    points = sweep.points()
    for point in points:
        reused = reused_from(sweep, point)
        status = point_status(sweep, point) + (f", reused from {reused}" if reused else "")
        print(f"# point {point.index} {point.name} [{status}]", file=file)
        print(point_command(sweep, point), file=file)
    first = 1 if points and points[0].is_base else 0
    before = "--point 0 (the base) first, then " if first else ""
    print(
        f"# job array: {before}points {first}-{len(points) - 1} in any order (e.g. sbatch --array={first}-"
        f"{len(points) - 1} ... --point $SLURM_ARRAY_TASK_ID), then --aggregate once all are done",
        file=file,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep file (params/sweeps/<name>.yaml)")
    parser.add_argument(
        "--outputs-dir",
        default=None,
        help="folder holding <sweep>/ (default: the base profile's common.outputs_dir, else the repo's outputs/)",
    )
    parser.add_argument("--print-commands", action="store_true", help="print one pipeline command per point and exit")
    parser.add_argument("--point", type=int, default=None, help="run only the point of this index (job arrays)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="common.threads of the points run (e.g. 1 for two points at a time on two cores: xargs -P 2)",
    )
    parser.add_argument("--aggregate", action="store_true", help="only aggregate finished points (and the notebook)")
    parser.add_argument("--no-notebook", action="store_true", help="do not execute notebooks/05_sweep.ipynb")
    parser.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="SUMMARY",
        help="an earlier summary.json of this sweep: its finished points that have no folder here are aggregated "
        "too (repeatable; e.g. docs/sweeps/<name>/summary.json, or points run on other machines)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 done, 1 a point failed, 2 bad input or a busy sweep or run, 130 / 143 interrupted."""
    args = _parser().parse_args(argv)
    try:
        with cli.interrupts_raise():
            return _run(args)
    except KeyboardInterrupt as err:
        print(interrupted_line(err, args.sweep), file=sys.stderr, flush=True)
        return cli.interrupt_status(err)
    except (SweepError, ConfigError, StageError, runlock.RunBusyError, cli.OutputsError) as err:
        return cli.error(str(err))
    except OSError as err:  # a write outside any point: summary.json, timings, the notebook copy
        return cli.error(cli.os_error_line(err))


def interrupted_line(err: BaseException, sweep_file: str) -> str:
    """'interrupted during sweep point 'seed0' (<folder>); re-run ...', naming the stage the pipeline was in."""
    name, folder = getattr(err, "sweep_point", (None, None))
    if name is None:
        where = f"during sweep {sweep_file}"
    else:
        stage = getattr(err, "stage", None)  # set by pipeline.execute
        point = f"sweep point {name!r} ({folder})"
        where = f"during {point}" if not stage else f"during stage {stage!r} of {point}"
        if stage and getattr(err, "stage_done", False):  # the stage finished as the signal came
            where = f"after stage {stage!r} of {point} finished"
    return f"interrupted {where}; re-run the same command to finish the remaining points"


def _run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, args.outputs_dir)
    if args.threads is not None:
        if args.threads < 1:
            raise SweepError(f"--threads {args.threads}: give a positive number of threads per point")
        sweep.threads = args.threads
    if args.print_commands:
        print_commands(sweep)
        return 0
    earlier = [merged_points(sweep, path) for path in args.merge]
    points = sweep.points()
    if args.point is not None and not 0 <= args.point < len(points):
        raise SweepError(f"--point {args.point}: {args.sweep} has points 0-{len(points) - 1}")
    chosen = [points[args.point]] if args.point is not None else points
    # a point with nothing here that a merged summary has finished is not run again; a built base always is (the
    # points run here read its files)
    todo = [p for p in chosen if p.is_base or not merged_entry(sweep, earlier, p)]
    for point in chosen:
        if point not in todo:
            print(f"[sweep] {point.index + 1}/{len(points)} {point.name}: done in a merged summary, skipped")
    if args.point is not None:  # one run, as the pipeline command of the point: its error line was printed
        failures = run_sweep(sweep, todo)
        return failures[0].status if failures else 0
    if args.aggregate:
        return _finish(sweep, args, [])
    with sweep_lock(sweep):
        return _finish(sweep, args, run_sweep(sweep, todo))


def _finish(sweep: Sweep, args: argparse.Namespace, failures: Sequence[PointFailure]) -> int:
    """Aggregate what finished (nothing when no point did), run the notebook on a sweep with no failure, list the
    failures last; 1 when a point failed."""
    if failures and not args.merge and all(point_status(sweep, p) != "done" for p in sweep.grid_points()):
        print("[sweep] no point finished: nothing aggregated", flush=True)
    else:
        summary = aggregate(sweep, merge=args.merge)
        print(
            f"[sweep] {len(summary['points'])} points, {len(summary['groups'])} groups -> {sweep.root / 'summary.json'}"
        )
    if failures:
        if not args.no_notebook:
            print(f"[sweep] notebook {NOTEBOOK} not run: not every point finished", flush=True)
        report_failures(sweep, failures, len(sweep.points()))
        return cli.EXIT_FAILED
    if not args.no_notebook:
        from papermill.exceptions import PapermillExecutionError

        try:
            run_notebook(sweep)
        except PapermillExecutionError as err:  # the executed copy holds the traceback
            cli.error(f"notebook {sweep.root / 'notebooks' / NOTEBOOK} failed: {err.ename}: {err.evalue}")
            return cli.EXIT_FAILED
    return 0
