"""Bench shapes: the workload ``python -m rlhf_lib.bench --shape NAME`` measures, and the GPU section of bench.json.

- ``default``: the bench's own workload (SmolLM2-135M, batch 8, 48-token responses, 1 minibatch; rlhf_lib.bench.cli).
- ``seed``: the seed profile's PPO (``params/seed_gpt2_ultrafeedback.yaml``): a GPT-2-sized model (GPT-2 124M's
  config: 12 layers, 768 wide, 12 heads, 50,257 tokens + a pad token) with random weights, batch 64, 4 minibatches,
  64-token responses, 4 PPO epochs, T = 0.7, full fine-tuning (the profile's ``use_lora: false``). Random weights
  because trained ones cannot reach an offline GPU machine; throughput depends on the shapes only (a random model
  almost never samples EOS, so every response runs the full 64 tokens on both sides). The tokenizer is the tiny
  GPT-2 stand-in's (SmolLM2's BPE with GPT-2's special tokens, ``tiny:gpt2``) padded with filler tokens to GPT-2's
  vocabulary size, since GPT-2's own tokenizer files are not available offline. Prompts are the bench's 12 short
  review prompts on both sides (the profile's ultrafeedback prompts need the Hugging Face hub).

The GPU section (:func:`gpu_section`) gathers what a GPU run reports: the device name, per configuration its
episodes/s, seconds per update by phase and peak GPU memory, and the ratios against TRL 1.12 measured in the same
run, with the targets of the seed shape (>= 3x TRL's episodes/s at <= 0.5x its peak GPU memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {  # shape -> BenchSpec fields it sets (the rest: BenchSpec's defaults)
    "default": {},
    "seed": {
        "model": "seed:gpt2-random",
        "batch_size": 64,
        "num_mini_batches": 4,
        "response_length": 64,
        "num_ppo_epochs": 4,
        "temperature": 0.7,
    },
}
SEED_MODEL_REF = "seed:gpt2-random"  # built on first use by :func:`ensure_seed_model` (or give --model)
GPT2_VOCAB_SIZE = 50257  # GPT-2's tokenizer; the seed pipeline adds <|pad|> (models.ensure_pad_token) on top
GPT2_SIZES = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}  # GPT-2 124M (GPT2Config defaults)
TINY_GPT2_SIZES = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}  # CPU dry runs
PAD_TOKEN = "<|pad|>"

# seed-shape PPO configurations: name -> PPOConfig fields changed from the default profile's (the layout of
# rlhf_lib.bench.configs.PPO_CONFIGS, merged into it there)
SEED_PPO_CONFIGS: dict[str, dict[str, Any]] = {
    "ours-seed": {"use_lora": False, "learning_rate": 1e-5, "compile_generation": True},
}
SEED_REFERENCE_CONFIG = "ours-seed"  # full fine-tuning, as the seed profile
SEED_CONFIGS = (SEED_REFERENCE_CONFIG, "ours-full-fp32", "ours-default")
SEED_DIFFERENCES = {
    "ours-seed": "The default profile's PPO with full fine-tuning of four models as TRL (the seed profile's "
    "use_lora: false), dtype auto (bf16 autocast with fp32 master weights where the device has bf16; "
    "TRL: fp32), compiled blocks and log-prob kernels, and the compiled decode step (CUDA graphs on a "
    "GPU; same maths up to bf16 rounding).",
}
TARGETS = {
    "seed": {"episodes_per_s_ratio_vs_trl": 3.0, "peak_gpu_ratio_vs_trl": 0.5}
}  # the GPU targets: >= 3x TRL's episodes/s at <= 0.5x its memory


def shape_fields(shape: str) -> dict[str, Any]:
    """BenchSpec fields of a shape; raises ValueError naming the known shapes."""
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: unknown; choose from {', '.join(SHAPES)}")
    return dict(SHAPES[shape])


def reference_config(shape: str, default_reference: str) -> str:
    """The configuration a shape's *_ratio_vs_trl keys compare (the seed shape: full fine-tuning, as its profile)."""
    return SEED_REFERENCE_CONFIG if shape == "seed" else default_reference


def _phases(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "total": result.get("s_per_update"),
        "generation": result.get("generation_s"),
        "forward": result.get("forward_s"),
        "optimization": result.get("optimization_s"),
    }


def gpu_section(report: dict[str, Any]) -> dict[str, Any]:
    """The GPU keys of a bench report (device_name is None on a CPU run, peak_gpu_gib None on both sides there).

    Per PPO configuration (TRL's under its own name): ``episodes_per_s``, ``seconds_per_update`` by phase,
    ``peak_gpu_gib`` (or its ``error``); then the reference configuration's ``episodes_per_s_ratio_vs_trl`` and
    ``peak_gpu_ratio_vs_trl`` (from :func:`rlhf_lib.bench.report.add_ratios`), and for a shape with targets whether they
    were met (None while a figure is missing).
    """
    shape = report["workload"].get("shape", "default")
    results = [r for r in report["configs"].values() if r.get("kind") == "ppo"]
    if report.get("trl"):
        results.append(report["trl"])
    configs = {}
    for r in results:
        name = r.get("name", "?")
        configs[name] = (
            {"error": r["error"]}
            if "error" in r
            else {
                "episodes_per_s": r.get("episodes_per_s"),
                "seconds_per_update": _phases(r),
                "peak_gpu_gib": r.get("peak_gpu_gib"),
            }
        )
    section: dict[str, Any] = {
        "device_name": report["device"].get("name"),
        "shape": shape,
        "reference_config": report["reference_config"],
        "configs": configs,
        "episodes_per_s_ratio_vs_trl": report.get("episodes_per_s_ratio_vs_trl"),
        "peak_gpu_ratio_vs_trl": report.get("peak_gpu_ratio_vs_trl"),
    }
    targets = TARGETS.get(shape)
    if targets:
        speed, memory = section["episodes_per_s_ratio_vs_trl"], section["peak_gpu_ratio_vs_trl"]
        section["targets"] = targets
        section["meets_targets"] = (
            None
            if speed is None or memory is None
            else speed >= targets["episodes_per_s_ratio_vs_trl"] and memory <= targets["peak_gpu_ratio_vs_trl"]
        )
    return section


# ----------------------------------------------------------------------------------------------------------------
# the seed shape's model: GPT-2 124M's config with random weights


def gpt2_tokenizer_like(source: str):
    """A tokenizer with GPT-2's vocabulary size and special tokens: `source`'s (a model reference or folder; the
    ``tiny:gpt2`` stand-in: EOS = BOS = <|endoftext|>, no chat template) with filler tokens up to 50,257, plus the
    <|pad|> token the seed pipeline adds to GPT-2."""
    from transformers import AutoTokenizer

    from rlhf_lib.lm import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model_ref(source))
    missing = GPT2_VOCAB_SIZE - len(tokenizer)
    if missing > 0:  # never sampled on purpose; they only give the embedding and LM head GPT-2's width
        tokenizer.add_tokens([f"<|gpt2_filler_{i}|>" for i in range(missing)])
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def build_gpt2_random(dest: Path, tokenizer_source: str = "tiny:gpt2", seed: int = 0, tiny: bool = False) -> Path:
    """Write a random-initialised GPT-2 (124M sizes; ``tiny``: 2 layers x 64) with :func:`gpt2_tokenizer_like`'s
    tokenizer into `dest` (a new folder); returns it."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from rlhf_lib.lm import models

    def build(out: Path) -> None:
        tokenizer = gpt2_tokenizer_like(tokenizer_source)
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **(TINY_GPT2_SIZES if tiny else GPT2_SIZES),
        )
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return models.atomic_build(Path(dest), build)


def ensure_seed_model(model: str) -> str:
    """`model` as a loadable reference: :data:`SEED_MODEL_REF` -> the cached GPT-2 124M random folder (built once
    from ``tiny:gpt2``'s tokenizer), anything else unchanged."""
    if model != SEED_MODEL_REF:
        return model
    from rlhf_lib.lm import models

    return str(build_gpt2_random(models.cache_root() / "gpt2-124m-random"))
