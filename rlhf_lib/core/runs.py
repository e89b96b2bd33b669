"""Run directories: ``outputs/<run>/`` layout, manifest (provenance), summary (headline numbers), stage states.

A run is a safe unit of work:

- one writer at a time: :func:`start_stage` takes the run's lock (:mod:`rlhf_lib.core.runlock`) until
  :func:`finish_stage` / :func:`fail_stage`; a second writer is refused with the holder's pid, host and start time;
- a stage's status is ``running``, ``done``, ``failed`` (with the error's first line and time) or ``stale`` (a stage
  it reads from was redone); a ``running`` stage whose writer is gone reads as ``interrupted``
  (:meth:`Run.stage_state`);
- ``overwrite`` writes the new attempt under ``.staging/<stage>/`` and swaps it in only when it finishes, so a failed
  or interrupted attempt leaves the finished stage (outputs, summary, status) as it was;
- ``resume`` refuses parameters that change what the stage computes (:func:`check_resume`);
- later stages check that the stages they read from are ``done``, so outputs of a crashed stage are never taken for
  complete ones.

In a multi-process stage (``accelerate launch``) rank 0 keeps the books (lock, manifest, summary); the other ranks
only get the run's paths.

With ``common.base_run`` set, a run reads the data and reward_model stages of that base run (:func:`stage_source`)
and never writes them; the manifest records which, with a content hash of each.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf_lib.core import runlock
from rlhf_lib.core.config import CommonConfig, ConfigError, to_dict
from rlhf_lib.core.io import repo_root, write_json_atomic  # noqa: F401  (re-exported: the run layer's writers)

# Sub-folders each stage owns (removed when a stage is overwritten) and the order of stages.
STAGE_DIRS = {
    "data": ["data"],
    "reward_model": ["reward_model"],
    "ppo": ["policy", "checkpoints", "ppo"],
    "eval": ["eval"],
}
STAGING = ".staging"  # <run>/.staging/<stage>/: an overwrite attempt's outputs until it finishes
# Parameters a resumed stage may change: logging / checkpoint cadence and bookkeeping, not what is computed
# (total_episodes may grow: the run continues further).
RESUME_MAY_CHANGE = frozenset(
    {"sample_every", "num_sample_rows", "save_every", "report_to", "resume", "threads", "overwrite", "outputs_dir"}
)
PREREQUISITES = {
    "data": [],
    "reward_model": ["data"],
    "ppo": ["data", "reward_model"],
    "eval": ["data", "reward_model", "ppo"],
}
# Stages a run may read from a base run (common.base_run) instead of producing them itself.
SHARED_STAGES = ("data", "reward_model")
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "accelerate",
    "peft",
    "datasets",
    "papermill",
    "numpy",
    "vaderSentiment",
)


class StageError(RuntimeError):
    """A stage cannot start: it already finished, a stage it reads from has not, or a resume changes its params."""


RunBusyError = runlock.RunBusyError  # another live process writes the run


def now() -> str:
    """The current UTC time, ISO 8601 to the second (manifest timestamps)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON at ``path``, or ``default`` when the file does not exist."""
    if not path.exists():
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the repo (None when not a git checkout)."""
    root = repo_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def package_versions() -> dict[str, str | None]:
    """Python, platform and the versions of the packages a run's numbers depend on."""
    out: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass(frozen=True)
class Run:
    """Paths of one run. Everything a run writes lives under ``root``.

    ``staged`` names a stage whose own sub-folders (STAGE_DIRS) point into ``.staging/<stage>/``: the Run an overwrite
    attempt of that stage writes through; every other path is the run's own.
    """

    root: Path
    staged: str | None = None

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def final(self) -> "Run":
        """This run without staging (where finished outputs live)."""
        return Run(self.root)

    def _sub(self, name: str) -> Path:
        if self.staged is not None and name in STAGE_DIRS[self.staged]:
            return self.root / STAGING / self.staged / name
        return self.root / name

    def path(self, *parts: str) -> Path:
        if not parts:
            return self.root
        return self._sub(parts[0]).joinpath(*parts[1:])

    @property
    def data_dir(self) -> Path:
        return self._sub("data")

    @property
    def reward_model_dir(self) -> Path:
        return self._sub("reward_model")

    @property
    def policy_dir(self) -> Path:
        return self._sub("policy")

    @property
    def checkpoints_dir(self) -> Path:
        return self._sub("checkpoints")

    @property
    def ppo_dir(self) -> Path:
        return self._sub("ppo")

    @property
    def eval_dir(self) -> Path:
        return self._sub("eval")

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def notebooks_dir(self) -> Path:
        return self.root / "notebooks"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path, {})

    def summary(self) -> dict[str, Any]:
        return read_json(self.summary_path, {})

    def stage_entry(self, stage: str) -> dict[str, Any]:
        """The manifest record of one stage ({} when it never started)."""
        return self.manifest().get("stages", {}).get(stage, {})

    def stage_status(self, stage: str) -> str | None:
        """The recorded status: running, done, failed, interrupted, stale, or None when the stage never started."""
        return self.stage_entry(stage).get("status")

    def stage_state(self, stage: str) -> str | None:
        """The status, with ``interrupted`` for a ``running`` stage whose writer is gone (killed or crashed)."""
        entry = self.stage_entry(stage)
        status = entry.get("status")
        return "interrupted" if status == "running" and writer_gone(self, entry) else status

    def upstream(self, stage: str) -> "Run":
        """The run whose folder holds ``stage``'s outputs (the base run for a shared stage; see stage_source)."""
        return stage_source(self, stage)


def writer_gone(run: Run, entry: dict[str, Any]) -> bool:
    """True when the process recorded as running a stage is certainly not running it any more.

    Certain when this process holds the run's lock itself (a live writer would hold it), or when the writer ran on
    this host and its pid is dead; a writer on another host with the lock free is not judged.
    """
    if entry.get("pid") == os.getpid() and entry.get("host") == socket.gethostname():
        return False
    lock = runlock.held(run.root)
    if lock is not None and not lock.delegated:
        return True
    return runlock.holder_alive(entry) is False


def describe_state(run: Run, stage: str) -> str:
    """A short phrase for messages: 'done', 'failed (ValueError: ...)', 'interrupted (pid 12 on host h ...)'."""
    entry, state = run.stage_entry(stage), run.stage_state(stage)
    if state is None:
        return "never started"
    if state == "failed":
        return f"failed at {entry.get('ended')} ({entry.get('error')})"
    if state == "interrupted" and entry.get("status") == "interrupted":
        return f"interrupted at {entry.get('ended')}"
    if state == "interrupted":
        return f"interrupted: its writer {runlock.describe_holder(entry)} is gone"
    return state


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")


def check_run_name(name: str) -> None:
    """Raise ConfigError unless ``name`` is a plain folder name (no spaces, '~', '/', '..', leading '.' or '-')."""
    if not _RUN_NAME.fullmatch(name or "") or ".." in name:
        raise ConfigError(
            f"run name {name!r} is not a plain folder name: use letters, digits and . _ - + = (starting with a letter "
            f"or digit, no '..', at most 100 characters), e.g. run: beta005 or --run beta005"
        )


def outputs_root(cfg: CommonConfig) -> Path:
    """The folder holding every run: ``outputs_dir`` (absolute; a relative one against the working directory)."""
    if not cfg.outputs_dir:
        return repo_root() / "outputs"
    return Path(os.path.abspath(Path(cfg.outputs_dir).expanduser()))


def run_for(cfg: CommonConfig) -> Run:
    """The Run of a config, without creating anything (raises ConfigError for a bad run name)."""
    check_run_name(cfg.run)
    return Run(outputs_root(cfg) / cfg.run)


def process_rank() -> int:
    """This process's global rank in a multi-process launch (``RANK`` of torchrun / accelerate launch), else 0."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


# ----------------------------------------------------------------------------------------------------------------
# shared upstream stages (common.base_run): read from another run, never written there


def base_run_for(cfg: CommonConfig) -> Run | None:
    """The base run named by ``cfg.base_run`` (a run name under outputs_dir, or an absolute run folder), or None."""
    ref = cfg.base_run
    if not ref:
        return None
    path = Path(ref).expanduser()
    if not path.is_absolute() and ("/" in ref or ref in (".", "..")):
        raise StageError(
            f"common.base_run {ref!r} must be a run name under {outputs_root(cfg)} or an absolute run folder"
        )
    return Run(path if path.is_absolute() else outputs_root(cfg) / ref)


def stage_source(run: Run, stage: str) -> Run:
    """The run whose folder holds ``stage``'s outputs: the base run recorded in the manifest for a shared stage
    (data, reward_model), else ``run`` itself. Later stages read data_dir / reward_model_dir through this."""
    if stage in SHARED_STAGES:
        root = (run.manifest().get("base_run") or {}).get("root")
        if root:
            return Run(Path(root))
    return run


def shared_stage_refusal(cfg: CommonConfig, stage: str) -> str | None:
    """Why ``stage`` may not run in this run (it is read from the base run), or None when it may."""
    if cfg.base_run and stage in SHARED_STAGES:
        return (
            f"run {cfg.run!r} reads stage {stage!r} from base run {cfg.base_run!r} (common.base_run), so it never "
            f"runs that stage itself: run it in the base run, run only ppo,eval here (--stages ppo,eval), "
            f"or set common.base_run: '' to build this run's own"
        )
    return None


def check_upstream(cfg: CommonConfig, run: Run, stage: str) -> Run | None:
    """The base run, after checking that this stage may start on it (its shared stages are done); None without one."""
    base = base_run_for(cfg)
    recorded = run.manifest().get("base_run") or {}
    if recorded and (base is None or Path(recorded["root"]).resolve() != base.root.resolve()):
        raise StageError(
            f"run {run.name!r} ({run.root}) already reads data + reward_model from base run "
            f"{recorded['name']!r} ({recorded['root']}); set common.base_run to it, or use a new run name"
        )
    if base is None:
        return None
    refusal = shared_stage_refusal(cfg, stage)
    if refusal:
        raise StageError(refusal)
    if base.root.resolve() == run.root.resolve():
        raise StageError(f"common.base_run {cfg.base_run!r} names run {run.name!r} itself; name another run")
    if not base.manifest_path.exists():
        raise StageError(
            f"base run {cfg.base_run!r} (common.base_run) does not exist: {base.root} has no "
            "manifest.json; build its data and reward_model stages first"
        )
    for before in PREREQUISITES[stage]:
        status = base.stage_status(before) if before in SHARED_STAGES else "done"
        if status != "done":
            raise StageError(
                f"stage {stage!r} of run {run.name!r} reads stage {before!r} of base run {base.name!r} "
                f"({base.root}), which is {status or 'missing'} there, not done: finish it in the base "
                "run"
            )
    return base


def stage_hash(run: Run, stage: str) -> str:
    """sha256 over the relative paths and bytes of every file a stage wrote (its STAGE_DIRS), in sorted order."""
    import hashlib

    digest = hashlib.sha256()
    for sub in STAGE_DIRS[stage]:
        folder = run.path(sub)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        for path in files:
            digest.update(path.relative_to(run.root).as_posix().encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def base_stage_hashes(run: Run) -> dict[str, str] | None:
    """sha256 of the data and reward-model stages a run read: its base run's, as its manifest recorded them when
    it started (:func:`upstream_record`), or its own finished ones (a run that built them); None when it has
    neither. Sweep points and comparisons record it as ``base_stages``, so two results can be told apart by the
    data and reward model they rest on."""
    recorded = (run.manifest().get("base_run") or {}).get("stages") or {}
    if recorded:
        return {stage: info.get("sha256") for stage, info in sorted(recorded.items())}
    own = {stage: stage_hash(run, stage) for stage in SHARED_STAGES if run.stage_status(stage) == "done"}
    return own or None


def upstream_record(run: Run, base: Run | None, stage: str) -> dict[str, Any] | None:
    """manifest["base_run"]: the base run's name, folder, and a content hash of each shared stage used (hashed
    once per finished base stage); refuses a base stage redone after this run used it."""
    if base is None:
        return None
    used = dict((run.manifest().get("base_run") or {}).get("stages") or {})
    base_stages = base.manifest().get("stages", {})
    for before in PREREQUISITES[stage]:
        if before not in SHARED_STAGES:
            continue
        ended = base_stages[before].get("ended")
        if before in used and used[before].get("ended") != ended:
            raise StageError(
                f"stage {before!r} of base run {base.name!r} ({base.root}) was redone after run "
                f"{run.name!r} used it (manifest.json base_run); start a new run on the new base"
            )
        if before not in used:
            used[before] = {"ended": ended, "sha256": stage_hash(base, before)}
    return {"name": base.name, "root": str(base.root.resolve()), "stages": used}


def _update_manifest(run: Run, update) -> dict[str, Any]:
    manifest = run.manifest()
    update(manifest)
    write_json_atomic(run.manifest_path, manifest)
    return manifest


def resume_conflicts(recorded: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each parameter that differs and may not change on resume (see RESUME_MAY_CHANGE).

    A key missing on either side (a field added or removed by a code change) is not judged.
    """
    changed = []
    for key in sorted(set(recorded) & set(new)):
        old, value = recorded[key], new[key]
        if old == value or key in RESUME_MAY_CHANGE:
            continue
        if key == "total_episodes" and isinstance(old, int) and isinstance(value, int) and value > old:
            continue
        changed.append(f"{key}: {old!r} -> {value!r}")
    return changed


def check_resume(run: Run, stage: str, params: dict[str, Any]) -> None:
    """Raise StageError when resuming ``stage`` with ``params`` would change what its recorded attempt computes."""
    recorded = run.stage_entry(stage).get("params")
    if not recorded:
        return
    changed = resume_conflicts(recorded, params)
    if changed:
        raise StageError(
            f"stage {stage!r} of run {run.name!r} cannot resume with changed parameters ({'; '.join(changed)}): the "
            f"updates already made used the recorded values. Put them back, start the stage over without resume "
            f"(--overwrite if it finished), or use another run name; on resume only "
            f"{', '.join(sorted(RESUME_MAY_CHANGE - {'resume'}))} and a larger total_episodes may change"
        )


def _check_may_start(run: Run, cfg: CommonConfig, stage: str) -> Run | None:
    """Refuse a stage that may not start (StageError); returns the base run it reads from (common.base_run), if any."""
    if run.stage_status(stage) == "done" and not cfg.overwrite:
        raise StageError(
            f"stage {stage!r} of run {run.name!r} already finished ({run.root}). Set overwrite: true to redo it "
            f"(its outputs are replaced once the new attempt finishes), or choose another run name."
        )
    base = check_upstream(cfg, run, stage)  # the base run (common.base_run) or None; refuses unfinished inputs
    for before in PREREQUISITES[stage]:
        if (base is None or before not in SHARED_STAGES) and run.stage_status(before) != "done":
            raise StageError(
                f"stage {stage!r} reads the outputs of stage {before!r}, which has not finished in run "
                f"{run.name!r} ({run.root}; it is {describe_state(run, before)}); run its notebook first "
                f"(make pipeline runs all stages in order)"
            )
    if getattr(cfg, "resume", False):
        check_resume(run, stage, to_dict(cfg))
    return base


def recover_interrupted(run: Run) -> list[str]:
    """Restore the finished stages that an interrupted overwrite attempt was to replace; returns their names.

    An overwrite attempt writes under ``.staging/``, so the finished outputs are intact: the stage is ``done`` again
    with ``last_attempt`` saying what happened. Call with the run's lock held.
    """
    restored = [
        s
        for s, e in run.manifest().get("stages", {}).items()
        if e.get("replaces") and run.stage_state(s) == "interrupted"
    ]

    def update(manifest: dict[str, Any]) -> None:
        for stage in restored:
            entry = manifest["stages"][stage]
            attempt = {
                "status": "interrupted",
                "started": entry.get("started"),
                "pid": entry.get("pid"),
                "host": entry.get("host"),
                "staging": entry.get("staging"),
            }
            manifest["stages"][stage] = {**entry["replaces"], "last_attempt": attempt}

    if restored:
        _update_manifest(run, update)
    return restored


def _prepare_outputs(run: Run, target: Run, stage: str, resume: bool) -> None:
    """A fresh attempt starts from empty stage folders; a resumed one keeps (or, staged, copies in) what it left."""
    if target.staged is None:
        if not resume:
            for sub in STAGE_DIRS[stage]:
                shutil.rmtree(run.path(sub), ignore_errors=True)  # a stage's outputs are all-or-nothing
        return
    staging = run.root / STAGING / stage
    if not resume:
        shutil.rmtree(staging, ignore_errors=True)
    elif not staging.exists():  # resuming a finished stage further: continue from copies of its outputs
        for sub in STAGE_DIRS[stage]:
            if run.path(sub).exists():
                shutil.copytree(run.path(sub), staging / sub)
    staging.mkdir(parents=True, exist_ok=True)


def _mark_later_stale(stages: dict[str, Any], stage: str) -> None:
    """A redone stage makes the finished stages that read from it stale."""
    for later, needs in PREREQUISITES.items():
        if stage in needs and later in stages and stages[later].get("status") == "done":
            stages[later]["status"] = "stale"


def _record_start(run: Run, target: Run, cfg: CommonConfig, stage: str, upstream: dict[str, Any] | None) -> None:
    from rlhf_lib.core.runtime import describe_device, pick_device

    def update(manifest: dict[str, Any]) -> None:
        manifest.setdefault("run", run.name)
        manifest.setdefault("created", now())
        manifest["git"] = git_state()
        manifest["versions"] = package_versions()
        manifest["device"] = describe_device(pick_device(cfg.device), cfg.dtype)  # with the precision and why
        stages = manifest.setdefault("stages", {})
        previous = stages.get(stage) or {}
        entry = {
            "status": "running",
            "started": now(),
            "seed": cfg.seed,
            "params": to_dict(cfg),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
        }
        if target.staged is not None:
            entry["staging"] = f"{STAGING}/{stage}"
            replaces = previous if previous.get("status") == "done" else previous.get("replaces")
            if replaces:
                entry["replaces"] = {k: v for k, v in replaces.items() if k != "last_attempt"}
        else:
            _mark_later_stale(stages, stage)
        stages[stage] = entry
        if upstream is not None:
            manifest["base_run"] = upstream

    _update_manifest(run, update)
    if target.staged is None:  # in place: the old headline numbers go with the old outputs
        summary = run.summary()
        if summary.pop(stage, None) is not None:
            write_json_atomic(run.summary_path, summary)


def start_stage(cfg: CommonConfig, stage: str) -> Run:
    """Take the run's lock, check the stage may start, record its params, seed and provenance; returns its Run.

    Refuses (StageError) a finished stage unless ``overwrite``, a stage whose inputs have not finished, a resume
    with changed parameters; RunBusyError when another live process writes the run. With ``overwrite`` the returned
    Run writes the stage's outputs under ``.staging/`` (swapped in by :func:`finish_stage`). Inside IPython a cell
    that raises marks the stage ``failed``.
    """
    from rlhf_lib.core.runtime import seed_everything, set_threads

    run = run_for(cfg)
    target = Run(run.root, stage) if cfg.overwrite else run
    resume = bool(getattr(cfg, "resume", False))
    if process_rank() == 0:
        new_run = not run.root.exists()
        lock = runlock.acquire(run.root, stage, what=f"stage {stage}")
        try:
            recover_interrupted(run)
            base = _check_may_start(run, cfg, stage)
            upstream = upstream_record(run, base, stage)
        except BaseException:
            lock.release(stage)
            if new_run:  # a refused first stage leaves no run folder behind (only its lock file was written)
                with contextlib.suppress(OSError):
                    (run.root / runlock.LOCK_NAME).unlink()
                    run.root.rmdir()
            raise
        _prepare_outputs(run, target, stage, resume)
        _record_start(run, target, cfg, stage, upstream)
        _watch_for_failure(target, stage)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    return target


def _swap_in(run: Run, stage: str) -> None:
    """Replace the stage's finished sub-folders by the staged ones (each move is one rename)."""
    staging, replaced = run.root / STAGING / stage, run.root / STAGING / f"{stage}.replaced"
    shutil.rmtree(replaced, ignore_errors=True)
    replaced.mkdir(parents=True)
    for sub in STAGE_DIRS[stage]:
        if (run.root / sub).exists():
            os.replace(run.root / sub, replaced / sub)
        if (staging / sub).exists():
            os.replace(staging / sub, run.root / sub)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        (run.root / STAGING).rmdir()  # only when empty


def finish_stage(run: Run, stage: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Swap a staged attempt's outputs in, record the headline numbers in summary.json, mark the stage done."""
    if process_rank() != 0:
        return summary
    if run.staged == stage:
        _swap_in(run, stage)
    full = run.summary()
    full[stage] = summary
    write_json_atomic(run.summary_path, full)

    def update(manifest: dict[str, Any]) -> None:
        stages = manifest.setdefault("stages", {})
        entry = stages.setdefault(stage, {})
        for key in ("replaces", "staging", "error"):
            entry.pop(key, None)
        entry["status"] = "done"
        entry["ended"] = now()
        if run.staged == stage:
            _mark_later_stale(stages, stage)

    _update_manifest(run, update)
    _end_hold(run, stage)
    return summary


def first_line(error: BaseException | str) -> str:
    """'TypeName: first line of the message' (or the string's first line), for status records."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    lines = text.strip().splitlines()
    return lines[0][:500] if lines else ""


def fail_stage(run: Run, stage: str, error: BaseException | str) -> None:
    """Record that the running attempt of ``stage`` failed (status ``failed``, first line of the error, time).

    A KeyboardInterrupt (Ctrl-C, or SIGTERM under :func:`rlhf_lib.core.cli.interrupts_raise`) is recorded as
    ``interrupted`` instead, which ``--skip-done`` resumes like a killed stage.

    An overwrite attempt instead restores the finished stage it was to replace (untouched under ``.staging/``),
    noting the failure in ``last_attempt``. Does nothing unless the stage is ``running``. Releases the lock.
    """
    if process_rank() != 0:
        return
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C or SIGTERM (core.cli.Interrupted): resumable, not a failure
        attempt = {
            "status": "interrupted",
            "error": f"interrupted ({error})" if str(error) else "interrupted",
            "ended": now(),
        }
    else:
        attempt = {"status": "failed", "error": first_line(error), "ended": now()}

    def update(manifest: dict[str, Any]) -> None:
        entry = manifest.get("stages", {}).get(stage)
        if not entry or entry.get("status") != "running":
            return
        if entry.get("replaces"):
            manifest["stages"][stage] = {**entry["replaces"], "last_attempt": {**attempt, "started": entry["started"]}}
        else:
            entry.update(attempt)

    if run.manifest_path.exists():
        _update_manifest(run, update)
    _end_hold(run, stage)


# -- failures inside IPython (a notebook run alone) ----------------------------------------------------------------

_WATCHERS: dict[tuple[str, str], tuple[Any, Any]] = {}


def _ipython():
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def _watch_for_failure(run: Run, stage: str) -> None:
    """In IPython: mark the stage failed when a later cell raises (papermill stops at that cell)."""
    shell = _ipython()
    if shell is None:
        return
    key = (str(run.root), stage)
    _unwatch(key)

    def post_run_cell(result) -> None:
        error = result.error_in_exec or result.error_before_exec
        if error is not None:
            fail_stage(run, stage, error)

    shell.events.register("post_run_cell", post_run_cell)
    _WATCHERS[key] = (shell, post_run_cell)


def _unwatch(key: tuple[str, str]) -> None:
    shell, callback = _WATCHERS.pop(key, (None, None))
    if shell is not None:
        try:
            shell.events.unregister("post_run_cell", callback)
        except ValueError:
            pass


def _end_hold(run: Run, stage: str) -> None:
    _unwatch((str(run.root), stage))
    lock = runlock.held(run.root)
    if lock is not None:
        lock.release(stage)


def rounded(obj: Any, digits: int = 3) -> Any:
    """A copy with floats rounded (summary cells print this so nbval compares stable numbers)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj
