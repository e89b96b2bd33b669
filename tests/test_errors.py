"""Bad params and bad model references: one `error:` line naming the file, the field or value, and the fix."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from rlhf_lib import pipeline
from rlhf_lib.core import config
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
