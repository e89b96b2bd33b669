"""Run directories: ``outputs/<run>/`` layout, manifest (provenance), summary (headline numbers), stage states.

A stage is started with :func:`start_stage` (which refuses to redo a finished stage unless ``overwrite`` is set)
and finished with :func:`finish_stage`; later stages check that the stages they read from are ``done``, so outputs
of a crashed stage are never taken for complete ones. With ``common.base_run`` set, a run reads the data and
reward_model stages of that base run (:func:`stage_source`) and never writes them; the manifest records which.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import CommonConfig, to_dict

# Sub-folders each stage owns (removed when a stage is overwritten) and the order of stages.
STAGE_DIRS = {
    "data": ["data"],
    "reward_model": ["reward_model"],
    "ppo": ["policy", "checkpoints", "ppo"],
    "eval": ["eval"],
}
PREREQUISITES = {"data": [], "reward_model": ["data"], "ppo": ["data", "reward_model"], "eval": ["data", "reward_model", "ppo"]}
# Stages a run may read from a base run (common.base_run) instead of producing them itself.
SHARED_STAGES = ("data", "reward_model")
TRACKED_PACKAGES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "papermill", "numpy", "vaderSentiment")


class StageError(RuntimeError):
    """A stage cannot start: it already finished, or a stage it reads from has not."""


def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml), falling back to the working directory."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent, *here.parents):
        if (candidate / "pyproject.toml").exists():
            return candidate
    return Path.cwd()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temp file + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
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
    out: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass(frozen=True)
class Run:
    """Paths of one run. Everything a run writes lives under ``root``."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def reward_model_dir(self) -> Path:
        return self.root / "reward_model"

    @property
    def policy_dir(self) -> Path:
        return self.root / "policy"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def ppo_dir(self) -> Path:
        return self.root / "ppo"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

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

    def stage_status(self, stage: str) -> str | None:
        return self.manifest().get("stages", {}).get(stage, {}).get("status")

    def upstream(self, stage: str) -> "Run":
        """The run whose folder holds ``stage``'s outputs (the base run for a shared stage; see stage_source)."""
        return stage_source(self, stage)


def outputs_root(cfg: CommonConfig) -> Path:
    return Path(cfg.outputs_dir).expanduser() if cfg.outputs_dir else repo_root() / "outputs"


def run_for(cfg: CommonConfig) -> Run:
    """The Run of a config, without creating anything."""
    if not cfg.run or "/" in cfg.run or cfg.run in (".", ".."):
        raise ValueError(f"run name {cfg.run!r} must be a plain folder name")
    return Run(outputs_root(cfg) / cfg.run)


# ----------------------------------------------------------------------------------------------------------------
# shared upstream stages (common.base_run): read from another run, never written there


def base_run_for(cfg: CommonConfig) -> Run | None:
    """The base run named by ``cfg.base_run`` (a run name under outputs_dir, or an absolute run folder), or None."""
    ref = cfg.base_run
    if not ref:
        return None
    path = Path(ref).expanduser()
    if not path.is_absolute() and ("/" in ref or ref in (".", "..")):
        raise StageError(f"common.base_run {ref!r} must be a run name under {outputs_root(cfg)} or an absolute "
                         "run folder")
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
        return (f"run {cfg.run!r} reads stage {stage!r} from base run {cfg.base_run!r} (common.base_run), so it never "
                f"runs that stage itself: run it in the base run, run only ppo,eval here (--stages ppo,eval), "
                f"or set common.base_run: '' to build this run's own")
    return None


def check_upstream(cfg: CommonConfig, run: Run, stage: str) -> Run | None:
    """The base run, after checking that this stage may start on it (its shared stages are done); None without one."""
    base = base_run_for(cfg)
    recorded = run.manifest().get("base_run") or {}
    if recorded and (base is None or Path(recorded["root"]).resolve() != base.root.resolve()):
        raise StageError(f"run {run.name!r} ({run.root}) already reads data + reward_model from base run "
                         f"{recorded['name']!r} ({recorded['root']}); set common.base_run to it, or use a new run name")
    if base is None:
        return None
    refusal = shared_stage_refusal(cfg, stage)
    if refusal:
        raise StageError(refusal)
    if base.root.resolve() == run.root.resolve():
        raise StageError(f"common.base_run {cfg.base_run!r} names run {run.name!r} itself; name another run")
    if not base.manifest_path.exists():
        raise StageError(f"base run {cfg.base_run!r} (common.base_run) does not exist: {base.root} has no "
                         "manifest.json; build its data and reward_model stages first")
    for before in PREREQUISITES[stage]:
        status = base.stage_status(before) if before in SHARED_STAGES else "done"
        if status != "done":
            raise StageError(f"stage {stage!r} of run {run.name!r} reads stage {before!r} of base run {base.name!r} "
                             f"({base.root}), which is {status or 'missing'} there, not done: finish it in the base "
                             "run")
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
            raise StageError(f"stage {before!r} of base run {base.name!r} ({base.root}) was redone after run "
                             f"{run.name!r} used it (manifest.json base_run); start a new run on the new base")
        if before not in used:
            used[before] = {"ended": ended, "sha256": stage_hash(base, before)}
    return {"name": base.name, "root": str(base.root.resolve()), "stages": used}


def _update_manifest(run: Run, update) -> dict[str, Any]:
    manifest = run.manifest()
    update(manifest)
    write_json_atomic(run.manifest_path, manifest)
    return manifest


def start_stage(cfg: CommonConfig, stage: str) -> Run:
    """Open (or create) the run, check the stage may start, record its params, seed and provenance."""
    from .runtime import describe_device, pick_device, seed_everything, set_threads

    run = run_for(cfg)
    status = run.stage_status(stage)
    if status == "done" and not cfg.overwrite:
        raise StageError(
            f"stage {stage!r} of run {run.name!r} already finished ({run.root}). Set overwrite: true to redo it "
            f"(its outputs are replaced), or choose another run name."
        )
    base = check_upstream(cfg, run, stage)  # the base run (common.base_run) or None; refuses unfinished inputs
    for before in PREREQUISITES[stage]:
        if (base is None or before not in SHARED_STAGES) and run.stage_status(before) != "done":
            raise StageError(
                f"stage {stage!r} reads the outputs of stage {before!r}, which has not finished in run "
                f"{run.name!r} ({run.root}); run its notebook first (make pipeline runs all stages in order)"
            )
    upstream = upstream_record(run, base, stage)
    run.root.mkdir(parents=True, exist_ok=True)
    if not getattr(cfg, "resume", False):  # a resumed stage (PPO) continues from the checkpoints it left
        for sub in STAGE_DIRS[stage]:
            shutil.rmtree(run.path(sub), ignore_errors=True)  # a stage's outputs are all-or-nothing
    set_threads(cfg.threads)
    seed_everything(cfg.seed)

    def update(manifest: dict[str, Any]) -> None:
        manifest.setdefault("run", run.name)
        manifest.setdefault("created", now())
        manifest["git"] = git_state()
        manifest["versions"] = package_versions()
        manifest["device"] = describe_device(pick_device(cfg.device))
        stages = manifest.setdefault("stages", {})
        stages[stage] = {"status": "running", "started": now(), "seed": cfg.seed, "params": to_dict(cfg)}
        if upstream is not None:
            manifest["base_run"] = upstream
        # A redone stage makes the stages that read from it stale.
        for later, needs in PREREQUISITES.items():
            if stage in needs and later in stages and stages[later].get("status") == "done":
                stages[later]["status"] = "stale"

    _update_manifest(run, update)
    summary = run.summary()
    if stage in summary:
        summary.pop(stage)
        write_json_atomic(run.summary_path, summary)
    return run


def finish_stage(run: Run, stage: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Record the stage's headline numbers in summary.json and mark it done in the manifest."""
    full = run.summary()
    full[stage] = summary
    write_json_atomic(run.summary_path, full)

    def update(manifest: dict[str, Any]) -> None:
        entry = manifest.setdefault("stages", {}).setdefault(stage, {})
        entry["status"] = "done"
        entry["ended"] = now()

    _update_manifest(run, update)
    return summary


def rounded(obj: Any, digits: int = 3) -> Any:
    """A copy with floats rounded (summary cells print this so nbval compares stable numbers)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj
