"""A run is a safe unit of work: one writer, failed / interrupted states, safe overwrite and resume, clear errors.

Concurrency and kill tests use real processes and real signals (SIGKILL), not mocks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from rlhf_lib import pipeline
from rlhf_lib.core import config, runlock, runs
from rlhf_lib.core.config import CommonConfig, ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "params" / "smoke.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# A writer in its own process: starts `stage` of run `r` under `outputs`, says so, then waits to be killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from rlhf_lib.core import runs
    from rlhf_lib.core.config import CommonConfig
    outputs, stage, overwrite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    runs.start_stage(CommonConfig(run="r", outputs_dir=outputs, overwrite=overwrite), stage)
    print("ready", flush=True)
    time.sleep(600)
""")


def _holder(outputs: str, stage: str = "data", overwrite: bool = False, env=None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, outputs, stage, "1" if overwrite else "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or ENV,
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _profile(tmp_path: Path, outputs: str, **sections) -> Path:
    params = yaml.safe_load(SMOKE.read_text())
    params["common"]["outputs_dir"] = outputs
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _finished(outputs: str, *stages: str, **kw) -> runs.Run:
    for stage in stages:
        run = runs.start_stage(CommonConfig(run="r", outputs_dir=outputs, **kw), stage)
        for sub in runs.STAGE_DIRS[stage]:
            run.path(sub).mkdir(parents=True, exist_ok=True)
            (run.path(sub) / "out.txt").write_text(f"finished {stage}")
        runs.finish_stage(run, stage, {"n": 1})
    return runs.run_for(CommonConfig(run="r", outputs_dir=outputs))


# -- 1. one writer per run ---------------------------------------------------------------------------------------


def test_second_writer_is_refused_at_once_naming_the_holder(tmp_path, outputs):
    """A pipeline on a run another process is writing exits 2 with one error line naming that process."""
    holder = _holder(outputs)
    try:
        profile = _profile(tmp_path, outputs)
        start = time.time()
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "rlhf_lib.pipeline",
                "--params",
                str(profile),
                "--run",
                "r",
                "--stages",
                "data",
                "-p",
                "data.n_rm_prompts=20",
            ],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert time.time() - start < 60  # refused before any notebook ran
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"pid {holder.pid} on host" in errors[0] and "stage data" in errors[0]
        params = runs.run_for(CommonConfig(run="r", outputs_dir=outputs)).stage_entry("data")["params"]
        assert params["outputs_dir"] == outputs  # the holder's record, untouched by the refused writer
        with pytest.raises(runs.RunBusyError, match=f"pid {holder.pid}"):  # a notebook's start_stage alike
            runs.start_stage(CommonConfig(run="r", outputs_dir=outputs), "data")
    finally:
        _kill(holder)


def test_children_of_the_holder_work_under_its_lock_and_others_do_not(outputs):
    """The pipeline's kernels carry its token; a process with another (or no) token is refused."""
    root = runs.run_for(CommonConfig(run="r", outputs_dir=outputs)).root
    lock = runlock.acquire(root, "pipeline", what="pipeline data")
    try:
        child = _holder(outputs, env={**ENV, runlock.LOCK_ENV: lock.info["token"]})
        _kill(child)
        stranger = subprocess.run(
            [sys.executable, "-c", HOLDER, outputs, "data", "0"],
            capture_output=True,
            text=True,
            env={**ENV, runlock.LOCK_ENV: "not-the-token"},
            cwd=ROOT,
            timeout=120,
        )
        assert stranger.returncode != 0 and f"pid {os.getpid()}" in stranger.stderr
    finally:
        lock.release("pipeline")
    assert (root / runlock.LOCK_NAME).read_text() == ""  # a clean release leaves no holder behind


def test_lock_of_a_killed_writer_is_reported_and_taken_over(outputs, capsys):
    holder = _holder(outputs)
    _kill(holder)
    run = runs.run_for(CommonConfig(run="r", outputs_dir=outputs))
    assert run.stage_state("data") == "interrupted"  # 7. a killed stage is not shown as running
    assert run.stage_status("data") == "running"
    runs.start_stage(CommonConfig(run="r", outputs_dir=outputs), "data")
    err = capsys.readouterr().err
    assert f"previous writer pid {holder.pid} on host" in err and "is gone" in err and "taking over" in err


# -- 2. resume refuses changed params ----------------------------------------------------------------------------


def test_resume_refuses_params_that_change_the_run(outputs):
    from rlhf_lib.ppo.trainer import PPOConfig

    base = dict(run="r", outputs_dir=outputs, total_episodes=16, batch_size=8)
    _finished(outputs, "data", "reward_model")
    runs.start_stage(PPOConfig(**base), "ppo")  # then interrupted
    changed = PPOConfig(**{**base, "resume": True, "kl_coef": 0.5, "learning_rate": 0.01, "batch_size": 4})
    with pytest.raises(runs.StageError) as err:
        runs.start_stage(changed, "ppo")
    message = str(err.value)
    for text in ("kl_coef: 0.05 -> 0.5", "learning_rate: 0.0005 -> 0.01", "batch_size: 8 -> 4"):
        assert text in message
    run = runs.run_for(PPOConfig(**base))
    assert run.stage_entry("ppo")["params"]["kl_coef"] == 0.05  # the manifest still records what ran
    with pytest.raises(runs.StageError, match="total_episodes: 16 -> 8"):
        runs.start_stage(PPOConfig(**{**base, "resume": True, "total_episodes": 8}), "ppo")
    cadence = dict(save_every=1, sample_every=2, num_sample_rows=1, threads=1, total_episodes=32)
    runs.start_stage(PPOConfig(**{**base, "resume": True, **cadence}), "ppo")
    assert run.stage_entry("ppo")["params"]["total_episodes"] == 32


def test_pipeline_checks_resume_params_before_running(tmp_path, outputs):
    _finished(outputs, "data", "reward_model")
    from rlhf_lib.ppo.trainer import PPOConfig

    runs.start_stage(PPOConfig(run="r", outputs_dir=outputs), "ppo")
    profile = _profile(tmp_path, outputs)
    with pytest.raises(runs.StageError, match="kl_coef: 0.05 -> 0.5"):
        pipeline.plan(str(profile), "r", ["ppo"], ["ppo.resume=true", "ppo.kl_coef=0.5"], False, False)


# -- 3. overwrite is never a default -----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(config.NOTEBOOKS))
def test_notebooks_do_not_overwrite_by_default(stage):
    nb = nbformat.read(ROOT / "notebooks" / config.NOTEBOOKS[stage], as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    lines = [line for line in cell.source.splitlines() if line.startswith("overwrite")]
    assert len(lines) == 1 and lines[0].split("=")[1].split("#")[0].strip() == "False"


# -- 4. / 5. a failed overwrite loses nothing --------------------------------------------------------------------


def test_failed_overwrite_attempt_keeps_the_finished_stage(outputs):
    run = _finished(outputs, "data", "reward_model")
    attempt = runs.start_stage(CommonConfig(run="r", outputs_dir=outputs, overwrite=True), "data")
    (attempt.data_dir).mkdir(parents=True)
    (attempt.data_dir / "out.txt").write_text("half-written")
    runs.fail_stage(attempt, "data", ValueError("data.dataset: no such file\nsecond line"))
    assert (run.data_dir / "out.txt").read_text() == "finished data"
    entry = run.stage_entry("data")
    assert entry["status"] == "done" and run.summary()["data"] == {"n": 1}
    assert entry["last_attempt"]["status"] == "failed"
    assert entry["last_attempt"]["error"] == "ValueError: data.dataset: no such file"
    assert run.stage_status("reward_model") == "done"  # nothing it read from changed


def test_failed_stage_records_error_and_time(outputs):
    run = runs.start_stage(CommonConfig(run="r", outputs_dir=outputs), "data")
    runs.fail_stage(run, "data", RuntimeError("boom"))
    entry = run.stage_entry("data")
    assert entry["status"] == "failed" and entry["error"] == "RuntimeError: boom" and entry["ended"]
    with pytest.raises(runs.StageError, match=r"it is failed at .*RuntimeError: boom"):
        runs.start_stage(CommonConfig(run="r", outputs_dir=outputs), "reward_model")


def test_killed_overwrite_attempt_leaves_the_finished_stage_done(outputs):
    run = _finished(outputs, "data")
    holder = _holder(outputs, overwrite=True)
    _kill(holder)
    assert run.stage_state("data") == "interrupted" and (run.data_dir / "out.txt").read_text() == "finished data"
    runs.start_stage(CommonConfig(run="r", outputs_dir=outputs), "reward_model")  # the data are still good
    entry = run.stage_entry("data")
    assert entry["status"] == "done" and entry["last_attempt"]["status"] == "interrupted"


def test_crashing_cell_marks_the_stage_failed(outputs):
    """Inside IPython (a notebook kernel) an exception in any later cell marks the stage failed."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.run_cell(
            f"from rlhf_lib.core import runs, config\n"
            f"run = runs.start_stage(config.CommonConfig(run='r', outputs_dir={outputs!r}), 'data')"
        )
        shell.run_cell("x = 1")
        assert runs.run_for(CommonConfig(run="r", outputs_dir=outputs)).stage_status("data") == "running"
        shell.run_cell("raise ValueError('bad row 3')")
    finally:
        InteractiveShell.clear_instance()
    entry = runs.run_for(CommonConfig(run="r", outputs_dir=outputs)).stage_entry("data")
    assert entry["status"] == "failed" and entry["error"] == "ValueError: bad row 3"
    assert runlock.held(runs.run_for(CommonConfig(run="r", outputs_dir=outputs)).root) is None  # lock released


@pytest.mark.slow
def test_pipeline_overwrite_with_bad_input_keeps_the_finished_stage_and_its_notebook(tmp_path, outputs):
    """--overwrite with a bad dataset: the finished data stage, summary and executed notebook are kept."""
    run = _finished(outputs, "data")
    run.notebooks_dir.mkdir(parents=True)
    kept = run.notebooks_dir / config.NOTEBOOKS["data"]
    kept.write_text("the finished stage's executed notebook")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi"}\n')  # no chosen / rejected columns: fails inside the stage
    profile = _profile(tmp_path, outputs, data={"dataset": str(bad)})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_lib.pipeline",
            "--params",
            str(profile),
            "--run",
            "r",
            "--stages",
            "data",
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage 'data' failed" in errors[0] and ".failed.ipynb" in errors[0]
    assert kept.read_text() == "the finished stage's executed notebook"
    assert kept.with_suffix(".failed.ipynb").exists()
    assert (run.data_dir / "out.txt").read_text() == "finished data" and run.summary()["data"] == {"n": 1}
    entry = run.stage_entry("data")
    assert entry["status"] == "done" and entry["last_attempt"]["status"] == "failed"


# -- 6. outputs_dir and run names ------------------------------------------------------------------------------


def test_relative_outputs_dir_resolves_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = _profile(tmp_path, "rel-out")
    ((_, injected),) = pipeline.plan(str(profile), "r", ["data"], [], False, False)
    assert injected["outputs_dir"] == str(tmp_path / "rel-out")  # the kernels (cwd notebooks/) get this path
    assert runs.outputs_root(CommonConfig(outputs_dir="rel-out")) == tmp_path / "rel-out"


@pytest.mark.parametrize("name", [" ", "a b", "~", "...", "../x", ".hidden", "-r", "a/b", ""])
def test_bad_run_names_are_one_error_line(tmp_path, outputs, name, capsys):
    with pytest.raises(ConfigError, match="not a plain folder name"):
        runs.run_for(CommonConfig(run=name, outputs_dir=outputs))
    profile = _profile(tmp_path, outputs)
    code = pipeline.main(["--params", str(profile), f"--run={name}", "--stages", "data"]) if name else 2
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and (not name or (len(err) == 1 and err[0].startswith("error: run name")))
    assert not Path(outputs).exists() or not any(Path(outputs).iterdir())  # nothing created


# -- 7. permissions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_json_respects_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        runs.write_json_atomic(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


# -- --skip-done after a killed PPO stage; two processes ---------------------------------------------------------


def _ppo_ready_run(outputs: str) -> runs.Run:
    """A run whose data stage finished (smoke) and whose reward_model stage is marked done (PPO uses a random head)."""
    from rlhf_lib.core.config import load_params_file, stage_parameters, validate
    from rlhf_lib.data import build as data

    params = load_params_file(SMOKE)
    params["common"].update(outputs_dir=outputs, run="r")
    cfg = validate(data.DataConfig, stage_parameters(params, "data"), "smoke")
    run = runs.start_stage(cfg, "data")
    runs.finish_stage(run, "data", data.prepare_data(cfg, run).summary)
    runs.finish_stage(runs.start_stage(CommonConfig(run="r", outputs_dir=outputs), "reward_model"), "reward_model", {})
    return run


PPO_ARGS = ["--run", "r", "--stages", "ppo", "--in-process", "-p", "ppo.reward_model=tiny:llama"]


@pytest.mark.slow
def test_skip_done_resumes_a_killed_ppo_stage_from_its_checkpoint(tmp_path, outputs):
    run = _ppo_ready_run(outputs)
    profile = _profile(tmp_path, outputs, ppo={"total_episodes": 48, "save_every": 1})  # 6 updates
    cmd = [sys.executable, "-m", "rlhf_lib.pipeline", "--params", str(profile), *PPO_ARGS]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run.checkpoints_dir / "update_0002" / "trainer_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "PPO ended before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert run.stage_state("ppo") == "interrupted"
    done_before = len((run.ppo_dir / "metrics.jsonl").read_text().splitlines())
    assert 2 <= done_before < 6
    resumed = subprocess.run([*cmd, "--skip-done"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "update_000" in resumed.stdout
    rows = [json.loads(line) for line in (run.ppo_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows] == [8 * i for i in range(1, 7)]  # each update once, none redone from 0
    assert (run.checkpoints_dir / "update_0001").exists()  # the checkpoints were kept, not deleted
    assert run.stage_status("ppo") == "done" and run.summary()["ppo"]["updates"] == 6


@pytest.mark.slow
def test_ppo_stage_with_two_processes(tmp_path, outputs):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: a 2-process gloo group (`--cpu` alone runs one).

    tests/ppo_replica_probe.py runs the pipeline and has each process record its own trainable weights and prompts:
    the processes train on different prompts yet end with bit-identical policy and value weights (their gradients
    are all-reduced; unsynchronised, each would step on its own prompts' gradient and the replicas would part), the
    ones the main process saved."""
    import math

    from ppo_replica_probe import tensor_sha256
    from safetensors.torch import load_file

    from rlhf_lib.ppo import checkpoints

    run = _ppo_ready_run(outputs)
    profile = _profile(tmp_path, outputs)
    launcher = Path(sys.executable).with_name("accelerate")
    replicas = tmp_path / "replicas"
    proc = subprocess.run(
        [
            str(launcher),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(ROOT / "tests" / "ppo_replica_probe.py"),
            "--params",
            str(profile),
            *PPO_ARGS,
        ],
        env={**ENV, "PPO_REPLICA_DIR": str(replicas)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = run.stage_entry("ppo")
    assert entry["status"] == "done" and entry["world_size"] == 2
    last = sorted(run.checkpoints_dir.glob("update_*"))[-1]
    assert (last / "rng_0.pt").exists() and (last / "rng_1.pt").exists()  # both ranks saved their sampling state
    rows = [json.loads(line) for line in (run.ppo_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(
        math.isfinite(r["objective/kl"]) and math.isfinite(r["loss/policy_avg"]) for r in rows
    )
    assert (run.policy_dir / "config.json").exists() and proc.stdout.count("[pipeline] outputs in") == 1
    rank0, rank1 = (json.loads((replicas / f"rank_{i}.json").read_text()) for i in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["updates"] == rank1["updates"] == 2
    assert len(rank0["queries"]) == 2 and all(a != b for a, b in zip(rank0["queries"], rank1["queries"]))
    assert rank0["start"] == rank1["start"] and rank0["end"]["policy"] != rank0["start"]["policy"]
    assert rank0["end"] == rank1["end"], "the two processes' replicas diverged: their gradients were not all-reduced"
    assert tensor_sha256(load_file(str(last / checkpoints.POLICY_FILE))) == rank0["end"]["policy"]
