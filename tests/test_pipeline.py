"""The pipeline runner: validation before anything runs, then the smoke profile end to end through papermill."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rlhf_lib import pipeline
from rlhf_lib.core import runs
from rlhf_lib.core.config import CommonConfig, ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "params" / "smoke.yaml"


def _profile(tmp_path: Path, outputs: str, **sections) -> Path:
    params = yaml.safe_load(SMOKE.read_text())
    params["common"]["outputs_dir"] = outputs
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_plan_rejects_unknown_keys_and_bad_overrides(tmp_path, outputs):
    bad = _profile(tmp_path, outputs, ppo={"kl_coeff": 0.1})
    with pytest.raises(ConfigError, match=r"\[ppo\]: unknown key 'kl_coeff'"):
        pipeline.plan(str(bad), None, ["data"], [], False, False)
    good = _profile(tmp_path, outputs)
    with pytest.raises(ConfigError, match="section.key=value"):
        pipeline.plan(str(good), None, ["data"], ["seed=3"], False, False)
    with pytest.raises(ConfigError, match="key 'seed' must be int"):
        pipeline.plan(str(good), None, ["data"], ["common.seed=abc"], False, False)
    todo = pipeline.plan(str(good), "other", ["data", "ppo"], ["common.seed=3"], False, False)
    assert [stage for stage, _ in todo] == ["data", "ppo"]
    assert todo[0][1]["seed"] == 3 and todo[0][1]["run"] == "other"


def test_plan_refuses_to_redo_a_finished_run(tmp_path, outputs):
    profile = _profile(tmp_path, outputs)
    todo = pipeline.plan(str(profile), "r", ["data"], [], False, False)
    run = runs.start_stage(CommonConfig(run="r", outputs_dir=outputs), "data")
    runs.finish_stage(run, "data", {})
    with pytest.raises(ConfigError, match="already finished stage 'data'"):
        pipeline.plan(str(profile), "r", ["data", "reward_model"], [], False, False)
    assert [s for s, _ in pipeline.plan(str(profile), "r", ["data", "reward_model"], [], False, True)] == [
        "reward_model"
    ]
    assert todo and pipeline.plan(str(profile), "r", ["data"], [], True, False)[0][1]["overwrite"] is True


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny:llama", "tiny:gpt2"])
def test_smoke_pipeline_end_to_end(tmp_path, outputs, model):
    """Every stage notebook under papermill on the smoke profile (tiny:gpt2 = the seed profile's model family)."""
    profile = _profile(tmp_path, outputs)
    root = pipeline.execute(str(profile), run=f"smoke-{model.split(':')[1]}", overrides=[f"common.model={model}"])
    manifest = json.loads((root / "manifest.json").read_text())
    summary = json.loads((root / "summary.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in ("data", "reward_model", "ppo", "eval"))
    assert manifest["stages"]["data"]["params"]["model"] == model
    for stage in ("data", "reward_model", "ppo", "eval"):
        assert (root / "notebooks" / pipeline.NOTEBOOKS[stage]).exists()
    assert summary["data"]["n_train_pairs"] > 0 and summary["data"]["n_eval_prompts"] > 0
    scores = pd.read_csv(root / "reward_model" / "eval_scores.csv")  # the held-out pairs the accuracy counts
    rm = summary["reward_model"]
    assert len(scores) == rm["n_eval_pairs"] > 0
    assert rm["eval_accuracy"] == pytest.approx((scores.reward_chosen > scores.reward_rejected).mean(), abs=1e-4)
    assert summary["ppo"]["updates"] >= 1 and summary["ppo"]["episodes"] >= 1
    assert summary["eval"]["n_eval_prompts"] > 0
    assert summary["eval"]["before"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference against itself
    assert list((root / "plots").glob("*.png"))
    # headless runs show text progress bars (console + executed notebook), not dead widgets
    ppo_nb = json.loads((root / "notebooks" / pipeline.NOTEBOOKS["ppo"]).read_text())
    outputs_ = [o for c in ppo_nb["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outputs_ if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert any("PPO: 100%" in "".join(o.get("text", "")) for o in outputs_)


def test_injected_parameters_are_complete_so_notebook_smoke_defaults_never_leak(tmp_path, outputs):
    """A field a profile leaves out must get the library default, not the notebook's smoke default."""
    from rlhf_lib.data.build import DataConfig

    profile = _profile(tmp_path, outputs)
    params = yaml.safe_load(profile.read_text())
    params["data"] = {"dataset": "simulated"}
    profile.write_text(yaml.safe_dump(params))
    ((_, injected),) = pipeline.plan(str(profile), None, ["data"], [], False, False)
    assert injected["generation_max_new_tokens"] == DataConfig().generation_max_new_tokens
    assert set(injected) == set(DataConfig.__dataclass_fields__)


@pytest.mark.slow
def test_an_ensemble_reward_reaches_ppo_and_the_evaluation(tmp_path, outputs):
    """reward_model.ensemble = 2 with ppo.ensemble_reward = min: PPO records it, and the evaluation (which follows
    PPO's choice) scores the reference with the members combined -- its cached scores equal the combined scorer's."""
    from rlhf_lib.reward.combined import MEMBERS_FILE, sequence_scorer

    profile = _profile(tmp_path, outputs)
    overrides = ["common.model=tiny:llama", "reward_model.ensemble=2", "ppo.ensemble_reward=min"]
    root = pipeline.execute(str(profile), run="smoke-ensemble", overrides=overrides)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["stages"]["ppo"]["params"]["ensemble_reward"] == "min"
    assert (root / "reward_model" / MEMBERS_FILE).exists()
    results = json.loads((root / "eval" / "results.json").read_text())
    assert results["reward"] == "min"
    score = sequence_scorer(root / "reward_model", "min", torch.device("cpu"), torch.float32, batch_size=8)
    mean = sequence_scorer(root / "reward_model", "mean", torch.device("cpu"), torch.float32, batch_size=8)
    records = [json.loads(p.read_text()) for p in (root / "eval_cache").glob("*.json")]
    assert records
    for record in records:
        sequences = [p + r for p, r in zip(record["prompt_ids"], record["response_ids"])]
        np.testing.assert_allclose(record["rm"], score(sequences), atol=1e-4)
        assert not np.allclose(record["rm"], mean(sequences), atol=1e-4)  # the combination is the one asked for
