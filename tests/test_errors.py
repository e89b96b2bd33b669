"""Every fault ends in one line: bad params and model references, files in a run folder that could run code,
unwritable outputs, a full disk, interrupts (real signals) and a folder as a dataset.

Each case asserts the exit status, the single `error:` (or `interrupted`) line naming the file, field or folder and
the fix, and that no traceback is printed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_lib import pipeline
from rlhf_lib.core import config, runs
from rlhf_lib.core.config import CommonConfig, ConfigError
from rlhf_lib.lm import models

SMOKE = Path(__file__).resolve().parents[1] / "params" / "smoke.yaml"


def params_file(tmp_path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def pipeline_error(path: Path, capsys, *extra: str) -> str:
    """The pipeline's exit code must be 2 and stderr one `error:` line; returns that line."""
    assert pipeline.main(["--params", str(path), "--run", "errors-test", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "text, pattern",
    [
        (
            "common:\n  run: x\n  seed: [1, 2\n",
            r"p.yaml line \d+ column \d+: invalid YAML \(.*\); check the indentation",
        ),
        ("common: {run: x}\n\tppo: {}\n", r"p.yaml line 2 column 1: invalid YAML"),
        ("", r"p.yaml is empty; a params file needs at least a common section"),
        ("# only a comment\n", r"p.yaml is empty"),
        ("{}\n", r"p.yaml is empty"),
        ("- common\n", r"p.yaml: expected a mapping of sections \(common, data, .*\), got list"),
        ("common: {run: x}\nppo: 5\n", r"p.yaml: section 'ppo' must be a mapping of key: value lines .* got int 5"),
        ("common: cpu\n", r"p.yaml: section 'common' must be a mapping .* got str 'cpu'"),
    ],
)
def test_unreadable_params_files(tmp_path, capsys, text, pattern):
    path = params_file(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern):
        config.load_params_file(path)
    assert pipeline_error(path, capsys)


def test_params_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"common:\n  run: caf\xe9\n")
    with pytest.raises(ConfigError, match="p.yaml: not UTF-8 text"):
        config.load_params_file(path)
    pipeline_error(path, capsys)


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("device", "tpu", r"\[common\]: device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        ("device", "cuda:x", r"device must be .* got 'cuda:x'"),
        ("threads", -3, r"\[common\]: threads must be >= 0 \(0: torch's default\), got -3"),
        ("dtype", "half", r"\[common\]: dtype must be auto, float32, bfloat16 or float16, got 'half'"),
    ],
)
def test_common_values_are_checked(capsys, key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config.validate(CommonConfig, {key: value}, "p.yaml [common]")
    err = pipeline_error(SMOKE, capsys, "-p", f"common.{key}={value}")
    assert key in err


@pytest.mark.parametrize(
    "key, value", [("device", "cuda:1"), ("device", "mps"), ("device", "auto"), ("threads", 0), ("dtype", "bf16")]
)
def test_valid_common_values_pass(key, value):
    assert getattr(config.validate(CommonConfig, {key: value}, "x"), key) == value


def test_stage_configs_get_the_common_checks_too():
    with pytest.raises(ConfigError, match=r"\[data\]: threads must be >= 0"):
        config.validate(config.stage_config_class("data"), {"threads": -1}, "p.yaml [data]")


def test_missing_model_folder_is_named_not_taken_for_a_hub_id(tmp_path, capsys):
    for ref in (str(tmp_path / "no" / "such" / "model"), "./models/mine", "~/no-such-model-dir", "a/b/c"):
        with pytest.raises(
            ConfigError, match=rf"model folder '{re.escape(ref)}' does not exist .* tried from .* hub id"
        ):
            config.validate(CommonConfig, {"model": ref}, "p.yaml [common]")
        with pytest.raises(ConfigError, match="does not exist"):
            models.load_tokenizer(ref)
    err = pipeline_error(SMOKE, capsys, "-p", f"common.model={tmp_path / 'nope'}")
    assert "model folder" in err and "does not exist" in err
    assert config.check_model_ref("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # hub ids pass (online users)
    assert config.check_model_ref("gpt2") is None


def test_model_folder_without_config_or_tokenizer(tmp_path):
    built = Path(models.resolve_model_ref("tiny:llama"))
    folder = tmp_path / "policy"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"model folder .*policy has no config.json; .*save_pretrained"):
        config.validate(CommonConfig, {"model": str(folder)}, "p.yaml [common]")
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):  # weights, but no tokenizer files
        shutil.copy(built / name, folder / name)
    with pytest.raises(
        ConfigError,
        match=r"model folder .*policy has no tokenizer \(none of tokenizer.json, .*\); "
        r"save one there with tokenizer.save_pretrained",
    ):
        config.validate(CommonConfig, {"model": str(folder)}, "p.yaml [common]")
    with pytest.raises(ConfigError, match="has no tokenizer"):
        models.load_tokenizer(str(folder))
    assert models.resolve_model_ref(str(folder)) == str(folder)  # loading weights alone needs no tokenizer
    shutil.copy(built / "tokenizer.json", folder / "tokenizer.json")
    assert models.load_tokenizer(str(folder)).eos_token_id == models.load_tokenizer("tiny:llama").eos_token_id


def test_model_folder_relative_to_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a notebook kernel in notebooks/: the repo-relative folder is still found
    with pytest.raises(ConfigError, match="tests/fixtures has no config.json"):
        config.validate(CommonConfig, {"model": "tests/fixtures"}, "x")


# -- nothing read from a run folder runs code ----------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _OneProcess:
    """The parts of an accelerate.Accelerator that save_checkpoint / load_checkpoint use, for one process."""

    is_main_process, process_index, device = True, 0, torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


def _saved_checkpoint(folder: Path):
    from rlhf_lib.ppo import checkpoints

    torch.manual_seed(0)
    policy, value = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=0.1)
    (policy(torch.randn(2, 4)).sum() + value(torch.randn(2, 4)).sum()).backward()
    optimizer.step()
    state = {"update": 3, "episode": 24, "kl_ctl": {"value": 0.05}}
    path = checkpoints.save_checkpoint(_OneProcess(), folder, 3, policy, value, optimizer, state, {"update": 3})
    return path, policy, value, optimizer


def test_checkpoint_state_round_trips_with_weights_only(tmp_path):
    import random

    import numpy as np

    from rlhf_lib.ppo import checkpoints

    random.random(), np.random.rand(), np.random.randn()  # a cached NumPy gaussian is part of the state too
    path, policy, value, optimizer = _saved_checkpoint(tmp_path / "checkpoints")
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    fresh_p, fresh_v = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    fresh_opt = torch.optim.AdamW([*fresh_p.parameters(), *fresh_v.parameters()], lr=0.1)
    state = checkpoints.load_checkpoint(_OneProcess(), path, fresh_p, fresh_v, fresh_opt)
    assert state == {"update": 3, "episode": 24, "kl_ctl": {"value": 0.05}}
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item()) == expected
    assert torch.equal(fresh_p.weight, policy.weight)
    moments = [s["exp_avg"] for s in fresh_opt.state_dict()["state"].values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, optimizer.state_dict()["state"].values()))


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_0.pt", "trainer_state.pt"])
def test_checkpoint_with_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path, name):
    from rlhf_lib.ppo import checkpoints

    path, *_ = _saved_checkpoint(tmp_path / "checkpoints")
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, path / name)
    policy, value = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    before = policy.weight.detach().clone()
    optimizer = torch.optim.AdamW([*policy.parameters(), *value.parameters()])
    with pytest.raises(checkpoints.UnsafeCheckpointError, match=rf"{name} holds Python objects .* could run code"):
        checkpoints.load_checkpoint(_OneProcess(), path, policy, value, optimizer)
    assert not marker.exists()
    assert torch.equal(policy.weight, before)  # refused before anything was applied


def _pickled_model_folder(tmp_path: Path, marker: Path) -> Path:
    """tiny:llama's folder with its weights as a pytorch_model.bin that runs code when unpickled."""
    built = Path(models.resolve_model_ref("tiny:llama"))
    folder = tmp_path / "model"
    shutil.copytree(built, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": _Payload(marker)}, folder / "pytorch_model.bin")
    return folder


def test_model_folders_with_pickled_weights_are_refused(tmp_path, capsys):
    from rlhf_lib.reward import scoring

    marker = tmp_path / "code-ran"
    folder = _pickled_model_folder(tmp_path, marker)
    with pytest.raises(ConfigError, match=r"weights only as pytorch_model.bin, a pickle that could run code"):
        config.validate(CommonConfig, {"model": str(folder)}, "p.yaml [common]")
    with pytest.raises(ConfigError, match="pytorch_model.bin"):
        models.load_causal_lm(str(folder), models.load_tokenizer("tiny:llama"))
    err = pipeline_error(SMOKE, capsys, "-p", f"common.model={folder}")
    assert "pytorch_model.bin" in err
    (folder / "stats.json").write_text("{}")
    with pytest.raises(OSError, match="model.safetensors"):  # a reward-model folder of a run: safetensors only
        scoring.load_reward_model(folder, require_stats=False)
    assert not marker.exists()


def test_adapter_folders_with_pickled_weights_are_refused(tmp_path):
    from rlhf_lib.compare import common

    marker = tmp_path / "code-ran"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    torch.save({"x": _Payload(marker)}, folder / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no adapter_model.safetensors .* could run code"):
        common.load_policy_folder(folder, "tiny:llama", models.load_tokenizer("tiny:llama"))
    assert not marker.exists()


def test_no_code_from_the_hub_or_a_folder_runs():
    root = Path(__file__).resolve().parents[1] / "rlhf_lib"
    offenders = [str(p) for p in root.rglob("*.py") if re.search(r"trust_remote_code\s*=\s*True", p.read_text())]
    assert offenders == []
    loads = [
        (str(p), line.strip())
        for p in root.rglob("*.py")
        for line in p.read_text().splitlines()
        if "torch.load(" in line and "weights_only=True" not in line
    ]
    assert loads == []


# -- outputs that cannot be written: refused before any stage, one line, exit 2 ------------------------------------


def test_outputs_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")
    err = pipeline_error(SMOKE, capsys, "-p", f"common.outputs_dir={blocker / 'runs'}")
    assert re.search(rf"{re.escape(str(blocker))} is a file, not a folder; set common.outputs_dir", err), err
    assert blocker.read_text() == "not a folder"


def _mount_read_only(folder: Path) -> None:
    proc = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here ({proc.stderr.strip()[:80]})")


def test_read_only_outputs_are_refused_before_any_stage(tmp_path, capsys):
    outputs = tmp_path / "ro"
    (outputs / "errors-test").mkdir(parents=True)
    _mount_read_only(outputs)
    try:
        err = pipeline_error(SMOKE, capsys, "-p", f"common.outputs_dir={outputs}")
    finally:
        subprocess.run(["umount", str(outputs)], check=True)
    assert re.search(r"common.outputs_dir .*ro is not writable \(Read-only file system\); set common.outputs_dir", err)
    assert sorted(p.name for p in outputs.iterdir()) == ["errors-test"]


def test_run_folder_without_write_permission_is_refused(tmp_path, capsys):
    """`chattr +i` makes a folder unwritable even for root (who passes every permission bit check)."""
    run = tmp_path / "outputs" / "errors-test"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    if subprocess.run(["chattr", "+i", str(run)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        err = pipeline_error(SMOKE, capsys, "-p", f"common.outputs_dir={run.parent}")
    finally:
        subprocess.run(["chattr", "-i", str(run)], check=True)
    assert re.search(r"run folder of 'errors-test' .* is not writable \(Operation not permitted\)", err), err
    assert (run / "manifest.json").read_text() == "{}"


def test_full_disk_during_a_stage_is_one_line_naming_the_folder_and_the_space(tmp_path):
    outputs = tmp_path / "small"
    outputs.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(outputs)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        result = _pipeline_cli("--stages", "data", "-p", f"common.outputs_dir={outputs}")
    finally:
        subprocess.run(["umount", str(outputs)], check=True)
    assert result.returncode == 2, result.stderr[-2000:]
    line = _one_error_line(result)
    assert "No space left on device" in line and f"the disk holding {outputs}" in line and "free" in line, line


# -- interrupts: one line, the stage recorded as interrupted, 130 / 143 --------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _pipeline_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf_lib.pipeline", "--params", str(SMOKE), "--run", "r", *args]
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _one_error_line(result) -> str:
    """stderr holds exactly one `error:` / `interrupted` line and no traceback; returns it."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(("error:", "interrupted"))]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _ppo_ready(tmp_path: Path) -> tuple[Path, runs.Run]:
    """A run whose data stage finished (smoke) and whose reward_model stage is marked done (PPO uses a random head)."""
    from rlhf_lib.data import build as data

    outputs = tmp_path / "outputs"
    params = config.load_params_file(SMOKE)
    params["common"].update(outputs_dir=str(outputs), run="r")
    cfg = config.validate(data.DataConfig, config.stage_parameters(params, "data"), "smoke")
    run = runs.start_stage(cfg, "data")
    runs.finish_stage(run, "data", data.prepare_data(cfg, run).summary)
    runs.finish_stage(
        runs.start_stage(CommonConfig(run="r", outputs_dir=str(outputs)), "reward_model"), "reward_model", {}
    )
    return outputs, run


LONG_PPO = [
    "--stages",
    "ppo",
    "-p",
    "ppo.reward_model=tiny:llama",
    "-p",
    "ppo.total_episodes=800",
    "-p",
    "ppo.save_every=1",
]


def _signal_after_checkpoint(cmd: list[str], run, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run.checkpoints_dir / "update_0001" / "trainer_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_ctrl_c_during_a_stage_notebook(tmp_path):
    from rlhf_lib.core import runlock

    outputs, run = _ppo_ready(tmp_path)
    cmd = [sys.executable, "-m", "rlhf_lib.pipeline", "--params", str(SMOKE), "--run", "r"]
    result = _signal_after_checkpoint([*cmd, "-p", f"common.outputs_dir={outputs}", *LONG_PPO], run, signal.SIGINT)
    assert result.returncode == 130, result.stderr[-3000:]
    line = _one_error_line(result)
    assert line == f"interrupted during stage 'ppo' ({run.root}); resume with --skip-done"
    assert run.stage_state("ppo") == "interrupted" and "interrupted" in run.stage_entry("ppo")["error"]
    runlock.acquire(run.root, "test").release("test")  # the lock was released: the next command may start at once
    assert (run.notebooks_dir / "03_ppo.failed.ipynb").exists() and not (run.notebooks_dir / "03_ppo.ipynb").exists()


@pytest.mark.slow
def test_sigterm_in_process_then_a_crafted_checkpoint_is_refused_on_resume(tmp_path):
    outputs, run = _ppo_ready(tmp_path)
    cmd = [sys.executable, "-m", "rlhf_lib.pipeline", "--params", str(SMOKE), "--run", "r", "--in-process"]
    cmd += ["-p", f"common.outputs_dir={outputs}", *LONG_PPO]
    result = _signal_after_checkpoint(cmd, run, signal.SIGTERM)
    assert result.returncode == 143, result.stderr[-3000:]
    assert _one_error_line(result) == f"interrupted during stage 'ppo' ({run.root}); resume with --skip-done"
    assert run.stage_state("ppo") == "interrupted"

    from rlhf_lib.ppo import checkpoints

    latest = checkpoints.latest_checkpoint(run.checkpoints_dir)
    marker = tmp_path / "code-ran"
    torch.save({"x": _Payload(marker)}, latest / "optimizer.pt")
    resumed = subprocess.run([*cmd, "--skip-done"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    line = _one_error_line(resumed)
    assert "optimizer.pt holds Python objects other than tensors and plain data" in line, line
    assert not marker.exists()
    assert run.stage_state("ppo") == "failed" and (latest / "policy.safetensors").exists()  # nothing deleted


# -- a folder as data.dataset ----------------------------------------------------------------------------------------


def test_a_folder_without_a_dataset_as_data_dataset(tmp_path):
    from rlhf_lib.data import formats

    folder = tmp_path / "prefs"
    folder.mkdir()
    with pytest.raises(formats.DataError, match=r"data.dataset .*prefs is a folder but no dataset could be read"):
        formats.load_raw(str(folder))


# -- the command line's earlier bad-input cases, in one table -------------------------------------------------------


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--params", "/no/such/profile.yaml"], r"params file /no/such/profile.yaml does not exist"),
        (["--run", "../x"], r"run name '../x' is not a plain folder name"),
        (["-p", "ppo.kl_coef"], r"override 'ppo.kl_coef' must look like section.key=value"),
        (["-p", "nosec.a=1"], r"override 'nosec.a=1': unknown section 'nosec'"),
        (["-p", "ppo.no_such_key=1"], r"parameters of stage 'ppo': unknown key 'no_such_key'. Valid keys: "),
        (["-p", "ppo.kl_coef=abc"], r"stage 'ppo': key 'kl_coef' must be float, got str 'abc'"),
        (["--stages", "ppo", "-p", "common.base_run=nope"], r"base run 'nope' \(common.base_run\) does not exist"),
        (["-p", "common.base_run=nope"], r"reads stage 'data' from base run 'nope' .*\(--stages ppo,eval\)"),
    ],
)
def test_bad_command_lines_are_one_line_and_leave_no_run_folder(tmp_path, capsys, args, pattern):
    outputs = tmp_path / "outputs"
    argv = ["--params", str(SMOKE), "--run", "errors-test", "-p", f"common.outputs_dir={outputs}", *args]
    assert pipeline.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not (outputs / "errors-test").exists()  # nothing was started, so nothing was left behind
