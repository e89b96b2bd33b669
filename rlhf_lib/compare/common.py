"""What every alternative to PPO shares: its inputs (a finished run's data and reward model, by path), LoRA, TRL
training arguments for a small CPU run, the reward-model reward on token ids, and saving / loading a policy folder.

A trained policy is saved the way the PPO stage saves its final policy (a merged, fp32 Hugging Face causal-LM folder
with the tokenizer), so :func:`rlhf_lib.evaluate.stage.default_policy_loader` loads it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_lib.core import runtime
from rlhf_lib.core.config import ConfigError
from rlhf_lib.lm import models

TRAIN_FILE = "train.json"  # beside policy/: train_seconds, generated_tokens, the trainer's log history


@dataclass(frozen=True)
class MethodInputs:
    """Where a method reads from: the initial policy (= the reference) and a finished run's stage-1/2 outputs."""

    model: str  # model reference of the initial policy, the same one the data and reward model were built with
    data_dir: Path  # a run's data/ folder: train_pairs.jsonl, ppo_prompts.jsonl, eval_prompts.jsonl
    reward_model_dir: Path  # a run's reward_model/ folder: merged sequence classifier + reward_stats.json
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # float32 or bfloat16 (TRL's bf16 mixed precision); auto: as runtime.pick_dtype

    def torch_device(self) -> torch.device:
        return runtime.pick_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return runtime.pick_dtype(self.dtype, self.torch_device())


@dataclass
class LoraFields:
    """LoRA settings shared by the trained methods (as the PPO stage's)."""

    use_lora: bool = True  # train LoRA adapters (peft); the reference is then the adapter-off base, one copy held
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (scale: lora_alpha / lora_r)
    lora_target_modules: list[str] = field(default_factory=list)  # []: peft's default for the architecture;
    #   ["all-linear"]: every linear layer but the head


def lora_config(cfg: LoraFields):
    """peft LoraConfig for a causal LM (dropout 0: RLHF trains with dropout off), or None without LoRA."""
    if not cfg.use_lora:
        return None
    from peft import LoraConfig

    targets: Any = list(cfg.lora_target_modules) or None
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets
    )


def training_arguments(inputs: MethodInputs, output_dir: Path, **values: Any) -> dict[str, Any]:
    """transformers/TRL TrainingArguments common to every method: no checkpoints, no hub, no loggers, our device."""
    device = inputs.torch_device()
    return {
        "output_dir": str(output_dir),
        "seed": inputs.seed,
        "data_seed": inputs.seed,
        "use_cpu": device.type == "cpu",
        "bf16": inputs.torch_dtype() == torch.bfloat16,
        "fp16": False,
        "gradient_checkpointing": False,  # TRL turns it on by default; small models do not need it
        "save_strategy": "no",
        "report_to": [],
        "push_to_hub": False,
        "disable_tqdm": False,
        "dataloader_num_workers": 0,
        **values,
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist: point data_dir at a run's data/ folder (run the data stage)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# reward: the stage-2 reward model on prompt + response token ids


def reward_stats(reward_model_dir: Path) -> tuple[float, float]:
    """(mean, std) of the RM's scores from reward_stats.json, as PPO normalises them; (0, 1) when absent."""
    path = Path(reward_model_dir) / "reward_stats.json"
    if not path.exists():
        return 0.0, 1.0
    stats = json.loads(path.read_text())
    return float(stats["mean"]), float(stats["std"]) or 1.0


def token_id_reward(
    score: Callable[[list[list[int]]], np.ndarray],
    prompt_column: str = "query_ids",
    mean: float = 0.0,
    std: float = 1.0,
) -> Callable[..., list[float]]:
    """A TRL reward function (``reward_funcs`` entry) scoring prompt + completion *token ids* with `score`.

    TRL's own path for a sequence-classification reward model re-tokenizes decoded text without special tokens, so
    the reward model would read its score at the last word instead of the EOS token it was trained on. This function
    gets the dataset's prompt ids (column `prompt_column`) and TRL's ``completion_ids`` (EOS kept) and scores exactly
    the tokens the evaluation stage scores, standardised like PPO's rewards.
    """

    def rm_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        queries = kwargs[prompt_column]
        sequences = [list(q) + list(c) for q, c in zip(queries, completion_ids)]
        # each response is scored exactly once: count what was generated (the method's sampling cost)
        rm_reward.generated_tokens += sum(len(c) for c in completion_ids)
        rm_reward.generated_responses += len(completion_ids)
        return ((np.asarray(score(sequences), dtype=np.float64) - mean) / std).tolist()

    rm_reward.__name__ = "reward_model"  # TRL logs rewards/<name>/mean
    rm_reward.generated_tokens = 0
    rm_reward.generated_responses = 0
    return rm_reward


# ----------------------------------------------------------------------------------------------------------------
# policy folders


def save_policy(model: torch.nn.Module, tokenizer, out_dir: Path) -> Path:
    """Save as the PPO stage saves its final policy: LoRA merged, fp32, HF folder + tokenizer, atomically."""
    out_dir = Path(out_dir)
    model = model.float()
    if models.is_peft(model):
        model = model.merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_policy_folder(path: Path, base_model: str, tokenizer, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A saved policy folder as a plain causal LM: a full HF folder as is, a LoRA adapter folder merged onto
    `base_model` (what ``PeftModel.save_pretrained`` writes)."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        if not (path / "adapter_model.safetensors").is_file():  # peft would fall back to a pickled .bin
            raise FileNotFoundError(
                f"{path} holds no adapter_model.safetensors (a pickled adapter_model.bin is not loaded: it could run "
                "code); save the adapter with PeftModel.save_pretrained (safetensors by default)"
            )

        base = models.load_causal_lm(base_model, tokenizer)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        return models.disable_dropout(model).to(device).eval()
    if (path / "config.json").exists():
        return models.load_causal_lm(str(path), tokenizer, device).eval()
    raise FileNotFoundError(f"{path} holds no policy (neither config.json nor adapter_config.json)")


def is_trained(folder: Path) -> bool:
    """A method setting finished training: its policy folder and train.json exist (train.json is written last)."""
    return (Path(folder) / "policy" / "config.json").exists() and (Path(folder) / TRAIN_FILE).exists()


def setting_inputs(inputs: MethodInputs, cfg: Any) -> dict[str, Any]:
    """What a trained setting depends on besides its beta, as train.json records it: the initial policy, the base
    run's data and reward model folders, the seed, and the method's config (all of it but the list of betas)."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("betas", "enabled")}
    record = {
        "model": inputs.model,
        "data_dir": str(Path(inputs.data_dir).resolve()),
        "reward_model_dir": str(Path(inputs.reward_model_dir).resolve()),
        "seed": inputs.seed,
        "config": config,
    }
    return json.loads(json.dumps(record, default=str))  # as it reads back from JSON


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """{"config": {"k": v}, ...} -> {"config.k": v, ...}"""
    out = {k: v for k, v in record.items() if k != "config"}
    return {**out, **{f"config.{k}": v for k, v in record.get("config", {}).items()}}


def check_trained(folder: Path, expected: dict[str, Any]) -> None:
    """Refuse to reuse a trained setting whose recorded inputs differ from this comparison's (one line: the key)."""
    recorded = read_train_record(folder).get("inputs")
    if recorded == expected:
        return
    if recorded is None:
        why = "records no inputs (data, reward model, seed, config), so it cannot be checked"
    else:
        old, new = _flat(recorded), _flat(expected)
        key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
        why = f"was trained with {key} = {old.get(key)!r}, this comparison has {new.get(key)!r}"
    raise ConfigError(
        f"{Path(folder) / TRAIN_FILE}: {why}; delete {folder} to retrain it, or write this comparison to another run "
        "(--run NAME)"
    )


def write_train_record(folder: Path, record: dict[str, Any]) -> None:
    from rlhf_lib.core.io import write_json_atomic

    write_json_atomic(Path(folder) / TRAIN_FILE, record)


def read_train_record(folder: Path) -> dict[str, Any]:
    path = Path(folder) / TRAIN_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class Stopwatch:
    """Wall seconds of a block: ``with Stopwatch() as t: ...; t.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start, self.seconds = time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def setting_label(name: str, value: float) -> str:
    """'beta=0.1' style setting names (also folder names)."""
    return f"{name}={value:g}"
