"""Typed, validated parameters.

A params file (``params/<profile>.yaml``) has one section per stage plus ``common``::

    common:        {run: default, model: "bundled:smollm2-135m-instruct", seed: 0, ...}
    data:          {...}   # rlhf_lib.data.build.DataConfig
    reward_model:  {...}   # rlhf_lib.reward.train.RewardModelConfig
    ppo:           {...}   # rlhf_lib.ppo.trainer.PPOConfig
    eval:          {...}   # rlhf_lib.evaluate.stage.EvalConfig

Papermill injects ``common`` + one stage section into that stage's notebook, where the parameters cell holds the
same names as literals; the notebook then calls :func:`from_namespace` to get a typed config. Papermill alone only
warns on unknown names, so :func:`load_params_file` rejects unknown keys and wrong types before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from rlhf_lib.core.io import local_path

STAGES = ("data", "reward_model", "ppo", "eval")
# Stage name -> "module:ConfigClass". Each stage's config lives beside the code that uses it.
STAGE_CONFIGS = {
    "data": "rlhf_lib.data.build:DataConfig",
    "reward_model": "rlhf_lib.reward.train:RewardModelConfig",
    "ppo": "rlhf_lib.ppo.trainer:PPOConfig",
    "eval": "rlhf_lib.evaluate.stage:EvalConfig",
}
NOTEBOOKS = {
    "data": "01_data_prep.ipynb",
    "reward_model": "02_reward_model.ipynb",
    "ppo": "03_ppo.ipynb",
    "eval": "04_evaluate.ipynb",
}


class ConfigError(ValueError):
    """A params file or notebook parameter is unknown or has the wrong type."""


@dataclass
class CommonConfig:
    """Settings shared by every stage of a run."""

    run: str = "smoke"  # run name: everything the run writes goes to <outputs_dir>/<run>/
    outputs_dir: str = ""  # "": the repo's outputs/ folder; set an absolute path (e.g. a Google Drive folder on Colab)
    model: str = "tiny:llama"  # policy + tokenizer: bundled:smollm2-135m-instruct, tiny:llama, tiny:gpt2, a hub id or a
    #   folder
    seed: int = 0  # one seed for the whole stage (python, numpy, torch)
    device: str = "auto"  # auto: CUDA when present, else CPU
    dtype: str = "auto"  # auto: bf16 autocast on GPUs with bf16 and on CPUs with AMX or AVX512-BF16 (else a bf16 probe
    #   decides), fp16 on older GPUs, else float32; or float32 / bfloat16 / float16
    threads: int = 0  # torch intra-op threads; 0: torch's default
    overwrite: bool = False  # re-run a stage this run already finished (its old outputs are replaced)
    base_run: str = ""  # "": none; else a run whose data + reward_model stages this run reads, never writes (a run name
    #   under outputs_dir, or an absolute run folder)


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
# What AutoTokenizer can build a tokenizer from (a folder with only tokenizer_config.json has none).
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# A hub id is "name" or "owner/name"; anything else that does not exist locally is a missing folder.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_common(cfg: CommonConfig) -> None:
    """Checks of the common section every stage shares (raise ValueError naming the field and the fix)."""
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.threads < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {cfg.threads}")
    if cfg.model:  # "" is meaningful only where a config documents it (compare: the base run's model)
        check_model_ref(cfg.model)


def check_model_ref(ref: str, need_tokenizer: bool = True) -> Path | None:
    """The local folder a model reference names (None for ``tiny:`` / ``bundled:`` references and hub ids).

    Raises ValueError for a folder that does not exist, is not a Hugging Face model folder (no config.json), holds
    its weights only as a pickle (``pytorch_model.bin`` can run code when loaded; only safetensors are read) or,
    with ``need_tokenizer``, holds no tokenizer, so a typo is not reported as an invalid hub id.
    """
    if ref.startswith(("tiny:", "bundled:")):
        return None
    path = local_path(ref)
    if not path.exists():
        if HUB_ID.fullmatch(ref) and not ref.startswith("."):
            return None  # a hub id; from_pretrained downloads it (online users)
        raise ValueError(
            f"model folder {ref!r} does not exist (relative paths are tried from {os.getcwd()} and the repo root); "
            f"give an existing folder, a hub id (owner/name) or tiny:llama / bundled:smollm2-135m-instruct"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model folder {path} has no config.json; point it at a folder written by "
            f"save_pretrained (a Hugging Face model folder)"
        )
    pickled = [name for name in PICKLED_WEIGHTS if (path / name).is_file()]
    if pickled and not any((path / name).is_file() for name in SAFETENSORS_WEIGHTS):
        raise ValueError(
            f"model folder {path} holds its weights only as {pickled[0]}, a pickle that could run code when loaded; "
            f"save them as safetensors (model.save_pretrained(folder), the default) and point at that folder"
        )
    if need_tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            f"save one there with tokenizer.save_pretrained({str(path)!r})"
        )
    return path


T = TypeVar("T")


def stage_config_class(stage: str) -> type:
    """The config dataclass of a stage (imported lazily so config.py has no heavy imports)."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    module, name = STAGE_CONFIGS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def field_comments(cls: type) -> dict[str, str]:
    """The help comment of each field in a config class's source (used by the notebooks, docs and tests).

    A field's help is its trailing ``# comment``, continued on the comment-only lines right below it that start
    with ``#`` and three spaces (a one-space ``# heading`` starts a new group of fields)::

        kl_coef: float = 0.05  # KL penalty coefficient beta
        #   (initial value when adap_kl_ctrl is on)
    """
    import inspect

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        name = None
        for line in inspect.getsource(klass).splitlines():
            stripped = line.strip()
            if name is not None and stripped.startswith("#   "):
                out[name] += " " + stripped[1:].strip()
                continue
            name = None
            if ":" in stripped and "#" in stripped and not stripped.startswith(("#", '"')):
                field_name = stripped.split(":", 1)[0].strip()
                if field_name.isidentifier():
                    name = field_name
                    out[name] = line[line.index("#") + 1 :].strip()
    return out


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def validate(cls: type[T], values: Mapping[str, Any], source: str, allow_missing: bool = True) -> T:
    """Build ``cls`` from ``values``; unknown keys and wrong types raise ConfigError naming source and key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}. Valid keys: {', '.join(names)}")
    if not allow_missing:
        missing = [n for n in names if n not in values]
        if missing:
            raise ConfigError(f"{source}: missing keys {missing}")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        hint = hints[key]
        if not _type_ok(value, hint):
            raise ConfigError(f"{source}: key {key!r} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
        clean[key] = float(value) if hint is float else value
    cfg = cls(**clean)
    checks = [check_common] if isinstance(cfg, CommonConfig) else []
    checks += [type(cfg).check] if hasattr(cfg, "check") else []
    for check in checks:
        try:
            check(cfg)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    """The params file's sections; an unreadable, empty or non-mapping file is a ConfigError naming the fix."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            problem += f", {context} that starts at line {start.line + 1}"
        raise ConfigError(f"{path}{where}: invalid YAML ({problem}); check the indentation and quoting there") from None
    if raw is None or raw == {}:
        raise ConfigError(
            f"{path} is empty; a params file needs at least a common section (start from "
            f"params/smoke.yaml or params/default.yaml)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (common, {', '.join(STAGES)}), got {type(raw).__name__}"
        )
    for section, value in raw.items():
        if section != "common" and section not in STAGES:
            raise ConfigError(f"{path}: unknown section {section!r}; sections are common, {', '.join(STAGES)}")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"{path}: section {section!r} must be a mapping of key: value lines (indented under "
                f"'{section}:'), got {type(value).__name__} {value!r}"
            )
    return raw


def load_params_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and validate a params file; returns ``{"common": {...}, stage: {...}}`` with every section present."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} does not exist (profiles live in params/*.yaml)")
    raw = _read_yaml(path)
    out: dict[str, dict[str, Any]] = {"common": dict(raw.get("common") or {})}
    validate(CommonConfig, out["common"], f"{path} [common]")
    common_names = {f.name for f in dataclasses.fields(CommonConfig)}
    for stage in STAGES:
        section = dict(raw.get(stage) or {})
        shadow = common_names & set(section)
        if shadow:
            raise ConfigError(f"{path} [{stage}]: {sorted(shadow)} belong in the common section")
        validate(stage_config_class(stage), {**out["common"], **section}, f"{path} [{stage}]")
        out[stage] = section
    return out


def stage_parameters(params: Mapping[str, Mapping[str, Any]], stage: str, **overrides: Any) -> dict[str, Any]:
    """Every field of the stage's config, resolved (dataclass defaults < common < stage section < overrides).

    All fields are injected, not only the keys the file sets: the notebooks' own parameter defaults are the tiny
    smoke profile, so a field left out of a profile must take the library default, not the notebook's.
    """
    merged = {**params.get("common", {}), **params.get(stage, {}), **overrides}
    return to_dict(validate(stage_config_class(stage), merged, f"parameters of stage {stage!r}"))


def from_namespace(stage: str, namespace: Mapping[str, Any]) -> Any:
    """Typed config for ``stage`` from a notebook's globals (the parameters cell plus papermill's injections)."""
    cls = stage_config_class(stage)
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ConfigError(f"notebook parameters cell of stage {stage!r} lacks {missing}")
    return validate(cls, {n: namespace[n] for n in names}, f"notebook parameters of stage {stage!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def exact_div(a: int, b: int, what: str) -> int:
    """a // b, refusing silent remainders (e.g. batch_size not divisible by mini_batch_size)."""
    if b <= 0 or a % b:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b
