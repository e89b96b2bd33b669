"""A sweep ends every fault in one line: a failed point is reported with its folder and the others go on, a point
that reads a failed base is skipped, a busy sweep or run is refused (exit 2), an interrupt stops the sweep (130 /
143); a re-run redoes only what did not finish.

The points run no model: ``pipeline.execute`` is replaced by a stand-in that writes a finished run (or fails the
chosen points), so these tests check the sweep runner's handling. The busy and signal cases use real processes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from rlhf_lib import pipeline
from rlhf_lib.core import cli, runlock
from rlhf_lib.core.config import ConfigError
from rlhf_lib.core.runs import StageError
from rlhf_lib.sweeps import runner as experiments

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
RERUN = "; fix the cause and re-run the same command (it runs only the unfinished points)"


def _sweep(tmp_path: Path, **changes) -> tuple[list[str], experiments.Sweep]:
    """A sweep 's' of the smoke profile (a built base and seeds 0-2): the command's arguments and the sweep."""
    raw = {"name": "s", "params": "params/smoke.yaml", "base_run": "build", "grid": {"common.seed": [0, 1, 2]}}
    raw.update(changes)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    return [str(path), "--outputs-dir", str(out)], experiments.load_sweep(path, str(out))


def _summary(seed: int) -> dict:
    curve = [
        {"label": "reference", "step": 0.0, "kl": 0.0, "rm_score": 0.0, "gold_score": 0.1},
        {"label": "final", "step": 4.0, "kl": 2.0, "rm_score": 1.0, "gold_score": 0.5 + seed},
    ]
    return {
        "ppo": {"final_kl": 2.0, "train_seconds": 3.0},
        "eval": {
            "before": {"gold_score": 0.1, "rm_score": 0.0, "kl": 0.0},
            "after": {"gold_score": 0.5 + seed, "rm_score": 1.0, "kl": 2.0},
            "win_rate_vs_ref": 0.5,
            "win_rate_ci": [0.4, 0.6],
            "win_rate_judge": "gold",
            "overoptimisation": curve,
        },
    }


def _write_run(root: Path, stages, status: str = "done") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"stages": {s: {"status": status} for s in stages}}))


def _stand_in(sweep: experiments.Sweep, calls: list[str], fail: dict[str, BaseException] | None = None):
    """pipeline.execute without models: records the point's name; a point in ``fail`` records its first stage
    failed and raises its exception, any other point is written as a finished run."""
    fail = fail or {}

    def execute(params_path, run=None, stages=(), overrides=(), skip_done=False, kernel_name="python3", **kw):
        calls.append(run)
        root = sweep.root / run
        if run in fail:
            _write_run(root, stages[:1], "failed")
            raise fail[run]
        _write_run(root, stages)
        if "eval" in stages:
            (root / "summary.json").write_text(json.dumps(_summary(int(run.removeprefix("seed")))))
        return root

    return execute


def _stderr_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


@pytest.fixture()
def notebooks(monkeypatch) -> list[str]:
    """The sweep notebook's runs (recorded, not executed)."""
    ran: list[str] = []
    monkeypatch.setattr(experiments, "run_notebook", lambda sweep, kernel_name="python3": ran.append(sweep.name))
    return ran


def test_a_failed_point_is_reported_the_others_run_and_a_rerun_redoes_only_it(tmp_path, capsys, monkeypatch, notebooks):
    args, sweep = _sweep(tmp_path)
    calls: list[str] = []
    failure = "stage 'ppo' failed: RuntimeError: boom (executed notebook with the traceback: x.failed.ipynb)"
    fail = {"seed1": pipeline.StageFailed(failure)}
    monkeypatch.setattr(pipeline, "execute", _stand_in(sweep, calls, fail))
    assert experiments.main(args) == 1
    assert calls == ["base", "seed0", "seed1", "seed2"]  # the sweep went on after seed1
    folder = sweep.root / "seed1"
    assert _stderr_lines(capsys) == [
        f"error: sweep point 'seed1' ({folder}): {failure}",
        f"error: sweep 's': 1 of 4 points failed{RERUN}",
        f"  failed: seed1 ({folder}): {failure}",
    ]
    summary = json.loads((sweep.root / "summary.json").read_text())  # what finished is aggregated
    assert [p["status"] for p in summary["points"]] == ["done", "ppo failed", "done"] and not summary["complete"]
    assert notebooks == []  # the report waits for a sweep with no failure

    calls.clear()
    monkeypatch.setattr(pipeline, "execute", _stand_in(sweep, calls))
    assert experiments.main(args) == 0
    assert calls == ["seed1"]  # the failed point is retried, the finished ones are skipped
    assert _stderr_lines(capsys) == []
    assert json.loads((sweep.root / "summary.json").read_text())["complete"] and notebooks == ["s"]


@pytest.mark.parametrize(
    "error,alone",
    [
        (pipeline.StageFailed("stage 'eval' failed: ValueError: bad"), 1),
        (pipeline.StageFailed("stage 'ppo' failed: OSError: [Errno 28] No space left on device"), 2),
        (ConfigError("ppo.kl_coef=-1 must be >= 0"), 2),
        (StageError("stage 'ppo' cannot start: stage 'data' of base run x is failed"), 2),
        (runlock.RunBusyError("run 'seed0' (x) is being written by pid 1 on host h"), 2),
        (OSError(errno.EACCES, "Permission denied", "/somewhere/seed0/manifest.json"), 2),
    ],
    ids=["stage-failed", "stage-no-space", "config", "stage-error", "busy", "os-error"],
)
def test_each_point_error_is_one_line_with_the_folder_and_the_sweep_goes_on(
    tmp_path, capsys, monkeypatch, error, alone
):
    args, sweep = _sweep(tmp_path, base_run="", stages=["ppo", "eval"])  # no base: every point runs on its own
    folder = sweep.root / "seed0"
    line = cli.os_error_line(error, folder) if isinstance(error, OSError) else str(error)
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "execute", _stand_in(sweep, calls, {"seed0": error}))
    assert experiments.main([*args, "--no-notebook"]) == 1
    assert calls == ["seed0", "seed1", "seed2"]
    assert _stderr_lines(capsys) == [
        f"error: sweep point 'seed0' ({folder}): {line}",
        f"error: sweep 's': 1 of 3 points failed{RERUN}",
        f"  failed: seed0 ({folder}): {line}",
    ]
    # the point alone (a job array's --point N): its one line and the pipeline's exit status for the error
    assert experiments.main([*args, "--point", "0"]) == alone
    assert _stderr_lines(capsys) == [f"error: sweep point 'seed0' ({folder}): {line}"]


def test_the_points_that_read_a_failed_base_are_skipped_not_run(tmp_path, capsys, monkeypatch, notebooks):
    args, sweep = _sweep(tmp_path)
    calls: list[str] = []
    failure = "stage 'reward_model' failed: RuntimeError: diverged"
    monkeypatch.setattr(pipeline, "execute", _stand_in(sweep, calls, {"base": pipeline.StageFailed(failure)}))
    assert experiments.main(args) == 1
    assert calls == ["base"]
    skipped = "not run: it reads the base point 'base', which failed"
    assert _stderr_lines(capsys) == [
        f"error: sweep point 'base' ({sweep.root / 'base'}): {failure}",
        f"error: sweep 's': 1 of 4 points failed, 3 not run{RERUN}",
        f"  failed: base ({sweep.root / 'base'}): {failure}",
        *[f"  skipped: seed{i} ({sweep.root / f'seed{i}'}): {skipped}" for i in range(3)],
    ]
    assert not (sweep.root / "summary.json").exists() and notebooks == []  # nothing finished to aggregate
    monkeypatch.setattr(pipeline, "execute", _stand_in(sweep, calls))
    assert experiments.main(args) == 0 and calls == ["base", "base", "seed0", "seed1", "seed2"]


def test_an_interrupt_stops_the_whole_sweep_in_one_line_and_a_rerun_finishes_it(tmp_path, capsys, monkeypatch):
    args, sweep = _sweep(tmp_path)
    calls: list[str] = []
    interrupt = cli.Interrupted(signal.SIGTERM)
    interrupt.stage = "ppo"  # as pipeline.execute sets it
    monkeypatch.setattr(pipeline, "execute", _stand_in(sweep, calls, {"seed0": interrupt}))
    assert experiments.main([*args, "--no-notebook"]) == 143
    assert calls == ["base", "seed0"]  # not a failed point: nothing after it runs
    assert _stderr_lines(capsys) == [
        f"interrupted during stage 'ppo' of sweep point 'seed0' ({sweep.root / 'seed0'}); re-run the same command "
        "to finish the remaining points"
    ]
    assert not (sweep.root / "summary.json").exists()
    monkeypatch.setattr(pipeline, "execute", _stand_in(sweep, calls))
    assert experiments.main([*args, "--no-notebook"]) == 0 and calls == ["base", "seed0", "seed0", "seed1", "seed2"]


def test_a_point_another_process_writes_is_refused_alone_and_skipped_in_a_sweep(tmp_path, capsys, monkeypatch):
    args, sweep = _sweep(tmp_path)
    _write_run(sweep.root / "base", ("data", "reward_model"))  # the base is built
    folder = sweep.root / "seed1"
    code = (
        "import sys, time; from pathlib import Path; from rlhf_lib.core import runlock; "
        "runlock.acquire(Path(sys.argv[1]), 'pipeline', what='pipeline ppo,eval'); print('held', flush=True); "
        "time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"run 'seed1' \({re.escape(str(folder))}\) is being written by pid {holder.pid} on host .*"
        # the point alone goes through the real pipeline, which is refused at the run's lock before any stage
        assert experiments.main([*args, "--point", "2"]) == 2
        (line,) = _stderr_lines(capsys)
        assert re.fullmatch(rf"error: sweep point 'seed1' \({re.escape(str(folder))}\): {busy}", line), line
        calls: list[str] = []
        real, stand_in = pipeline.execute, _stand_in(sweep, calls)
        monkeypatch.setattr(
            pipeline, "execute", lambda *a, **kw: real(*a, **kw) if kw["run"] == "seed1" else stand_in(*a, **kw)
        )
        assert experiments.main([*args, "--no-notebook"]) == 1
        assert calls == ["seed0", "seed2"]  # the others ran
        first, header, listed = _stderr_lines(capsys)
        assert re.fullmatch(rf"error: sweep point 'seed1' \({re.escape(str(folder))}\): {busy}", first), first
        assert header == f"error: sweep 's': 1 of 4 points failed{RERUN}"
        assert re.fullmatch(rf"  failed: seed1 \({re.escape(str(folder))}\): {busy}", listed), listed
    finally:
        holder.kill()
        holder.wait()


# A sweep in its own process whose points sleep: says "ready" when its first point starts, then waits for a signal.
DRIVER = textwrap.dedent("""
    import sys, time
    from rlhf_lib import pipeline
    from rlhf_lib.sweeps import runner

    def execute(*args, **kwargs):
        print("ready", flush=True)
        time.sleep(120)

    pipeline.execute = execute
    sys.exit(runner.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_running_sweep_refuses_a_second_and_stops_on_a_signal_in_one_line(
    tmp_path, capsys, monkeypatch, signum, status
):
    args, sweep = _sweep(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args, "--no-notebook"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    try:
        for line in proc.stdout:
            if line.strip() == "ready":
                break
        else:
            pytest.fail(f"the sweep ended before its first point: {proc.stderr.read()}")
        calls: list[str] = []
        monkeypatch.setattr(pipeline, "execute", _stand_in(sweep, calls))
        assert experiments.main([*args, "--no-notebook"]) == 2  # a second sweep of it is refused before any point
        (line,) = _stderr_lines(capsys)
        assert re.fullmatch(
            rf"error: sweep 's' \({re.escape(str(sweep.root))}\) is being run by pid {proc.pid} on host .*; wait for "
            "it to finish or stop it",
            line,
        ), line
        assert calls == []
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status
    assert err.splitlines() == [
        f"interrupted during sweep point 'base' ({sweep.root / 'base'}); re-run the same command to finish the "
        "remaining points"
    ]
