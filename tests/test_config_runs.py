"""Params validation, run-directory safety, manifest/summary provenance."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest

from rlhf_lib.core import config, runs
from rlhf_lib.core.config import CommonConfig, ConfigError, validate


@dataclass
class _Toy(CommonConfig):
    learning_rate: float = 1e-5  # step size
    epochs: int = 1  # passes
    names: list[str] = dataclasses.field(default_factory=list)  # some names
    limit: int | None = None  # optional

    def check(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")


def test_validate_accepts_and_coerces():
    cfg = validate(_Toy, {"learning_rate": 1, "epochs": 3, "names": ["a"], "limit": None}, "x.yaml")
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.epochs == 3 and cfg.names == ["a"]


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"x.yaml: unknown key 'learning_rat'.*did you mean 'learning_rate'"):
        validate(_Toy, {"learning_rat": 0.1}, "x.yaml")


@pytest.mark.parametrize(
    "key,value", [("epochs", 1.5), ("epochs", True), ("learning_rate", "1e-5"), ("names", "a"), ("overwrite", 1)]
)
def test_wrong_type_is_named(key, value):
    with pytest.raises(ConfigError, match=rf"x.yaml: key '{key}' must be"):
        validate(_Toy, {key: value}, "x.yaml")


def test_check_method_runs():
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        validate(_Toy, {"epochs": 0}, "x.yaml")


def test_params_file_errors(tmp_path):
    bad_section = tmp_path / "a.yaml"
    bad_section.write_text("common: {}\nppo_stage: {}\n")
    with pytest.raises(ConfigError, match="unknown section 'ppo_stage'"):
        config.load_params_file(bad_section)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_params_file(tmp_path / "missing.yaml")
    bad_common = tmp_path / "b.yaml"
    bad_common.write_text("common: {seed: '3'}\n")
    with pytest.raises(ConfigError, match=r"\[common\]: key 'seed' must be int"):
        config.load_params_file(bad_common)


def _cfg(outputs, **kw):
    return CommonConfig(run="r1", outputs_dir=outputs, **kw)


def test_stage_lifecycle_and_manifest(outputs):
    run = runs.start_stage(_cfg(outputs, seed=7), "data")
    manifest = run.manifest()
    assert manifest["stages"]["data"]["status"] == "running"
    assert manifest["stages"]["data"]["params"]["seed"] == 7
    assert {"torch", "transformers", "trl"} <= set(manifest["versions"])
    assert "commit" in manifest["git"] and "dirty" in manifest["git"]
    assert manifest["device"]["type"] in ("cpu", "cuda")
    runs.finish_stage(run, "data", {"n_train_pairs": 3})
    assert run.stage_status("data") == "done"
    assert json.loads(run.summary_path.read_text())["data"] == {"n_train_pairs": 3}


def test_finished_stage_is_not_silently_redone(outputs):
    run = runs.start_stage(_cfg(outputs), "data")
    (run.data_dir).mkdir()
    (run.data_dir / "keep.txt").write_text("precious")
    runs.finish_stage(run, "data", {"n": 1})
    with pytest.raises(runs.StageError, match="already finished.*overwrite: true"):
        runs.start_stage(_cfg(outputs), "data")
    assert (run.data_dir / "keep.txt").read_text() == "precious"  # nothing lost
    attempt = runs.start_stage(_cfg(outputs, overwrite=True), "data")
    assert attempt.data_dir != run.data_dir and not attempt.data_dir.exists()  # the attempt starts empty, aside
    assert (run.data_dir / "keep.txt").exists() and run.summary()["data"] == {"n": 1}  # until it finishes
    attempt.data_dir.mkdir()
    (attempt.data_dir / "new.txt").write_text("new")
    runs.finish_stage(attempt, "data", {"n": 2})
    assert not (run.data_dir / "keep.txt").exists() and (run.data_dir / "new.txt").read_text() == "new"
    assert run.summary()["data"] == {"n": 2} and run.stage_status("data") == "done"
    assert not (run.root / runs.STAGING).exists()


def test_stage_needs_finished_prerequisite(outputs):
    run = runs.start_stage(_cfg(outputs), "data")  # started, never finished (e.g. crashed)
    with pytest.raises(runs.StageError, match="stage 'data', which has not finished"):
        runs.start_stage(_cfg(outputs), "reward_model")
    runs.finish_stage(run, "data", {})
    runs.start_stage(_cfg(outputs), "reward_model")


def test_redoing_a_stage_marks_later_stages_stale(outputs):
    run = runs.start_stage(_cfg(outputs), "data")
    runs.finish_stage(run, "data", {})
    runs.finish_stage(runs.start_stage(_cfg(outputs), "reward_model"), "reward_model", {})
    attempt = runs.start_stage(_cfg(outputs, overwrite=True), "data")
    assert run.stage_status("reward_model") == "done"  # the old data are still in place
    runs.finish_stage(attempt, "data", {})
    assert run.stage_status("reward_model") == "stale"


def test_bad_run_names(outputs):
    for name in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="plain folder name"):
            runs.run_for(CommonConfig(run=name, outputs_dir=outputs))


def test_atomic_json_write(tmp_path):
    path = tmp_path / "x.json"
    runs.write_json_atomic(path, {"a": 1})
    assert runs.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp files left behind
