"""What `make bench` measures: the workload (:class:`BenchSpec`), the named configurations (:data:`PPO_CONFIGS`,
:data:`RM_CONFIGS`, :data:`SCORING_CONFIGS`; :data:`DIFFERENCES` describes each), TRL 1.12's published figures, the
prompts, the host probe's matmul sizes, and the PPOConfig and RewardModelConfig each configuration runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_lib.bench import shapes as bench_shapes
from rlhf_lib.core.io import repo_root

DEFAULT_CONFIGS = (
    "ours-default",
    "ours-lora-bf16",
    "ours-default-compile-generation",
    "ours-full-fp32",
    "rm",
    "rm-trl",
)
PROFILE = "params/default.yaml"  # every ours-* configuration starts from this profile's ppo (and common) settings,
#   both RM configurations from its reward_model (and common) settings
REFERENCE_CONFIG = "ours-default"  # the configuration the *_ratio_vs_trl keys compare: exactly the default profile's
FULL_FT_LR = 1e-5  # full fine-tuning learning rate on both sides (LoRA configs keep the profile's)
# name -> PPOConfig fields changed from the default profile's (the workload fields come from BenchSpec)
PPO_CONFIGS: dict[str, dict[str, Any]] = {
    "ours-default": {},
    "ours-lora-bf16": {"dtype": "bfloat16", "torch_compile": False},
    "ours-default-compile-generation": {"compile_generation": True},
    "ours-default-top15": {"trainable_top_layers": 15},
    "ours-full-fp32": {"use_lora": False, "dtype": "float32", "torch_compile": False, "learning_rate": FULL_FT_LR},
    "ours-full-bf16": {"use_lora": False, "dtype": "bfloat16", "torch_compile": False, "learning_rate": FULL_FT_LR},
    "ours-lora-fp32": {"dtype": "float32", "torch_compile": False},
}
# name -> what trains the default profile's reward model: the stage's own loop (reward.fit) or TRL's RewardTrainer
# built as reward.train.reward_trainer builds it; both with the same RewardModelConfig on the same pairs
RM_CONFIGS = {"rm": "our loop", "rm-trl": "TRL RewardTrainer"}
# rm_pairs_per_s_ratio_vs_trl = the first one's pairs/s over the second one's
RM_REFERENCE_CONFIG, RM_TRL_CONFIG = "rm", "rm-trl"
# name -> what scores with the default profile's reward model: a k-member ensemble combined (MemberStack) against one
# member, alternating in one process; rm_ensemble_cost_ratio = the ensemble's seconds over the single member's
SCORING_CONFIGS = {"rm-ensemble-score": "MemberStack vs one member"}
RM_ENSEMBLE_SCORE_CONFIG = "rm-ensemble-score"
KNOWN_CONFIGS = (*PPO_CONFIGS, *RM_CONFIGS, *SCORING_CONFIGS)
TRL_CONFIG_NAME = "trl-1.12-full-fp32"
# TRL 1.12 on this workload, 2 threads, fp32, CPU shared with another job, as first measured for this repo: +-30 %
PUBLISHED_TRL = {
    "source": "first measurement for this repo (TRL 1.12, CPU, 2 threads, fp32, contended machine, +-30 %), "
    "not measured in this run",
    "episodes_per_s": 0.30,
    "s_per_update": 27.0,
    "generation_s": 3.5,
    "rollout_s": 6.5,
    "optimization_s": 20.0,
    "peak_rss_gib": 7.8,
}
# the workload the published figures describe: the published ratios are given only for it
PUBLISHED_WORKLOAD = {
    "model": "bundled:smollm2-135m-instruct",
    "batch_size": 8,
    "response_length": 48,
    "num_ppo_epochs": 4,
    "num_mini_batches": 1,
}
PROMPT_SUBJECTS = (
    "headphones",
    "coffee maker",
    "novel",
    "hiking boots",
    "laptop",
    "sci-fi film",
    "pizza place",
    "board game",
    "tent",
    "phone",
    "bicycle",
    "museum",
)
DIFFERENCES = {
    "ours-default": "The default profile's PPO settings: LoRA r16 on policy and value (q_proj, v_proj) instead of "
    "full fine-tuning; reference = policy with adapter off, reward = value model with adapter off (2 "
    "base copies instead of 4); dtype auto (bf16 autocast with fp32 master weights on CUDA / AMX "
    "CPUs; TRL: fp32); each transformer block and the log-prob kernels torch.compile'd where a "
    "compiler is present (ppo.torch_compile; compiling happens in the warm-up updates).",
    "ours-lora-bf16": "ours-default with bf16 autocast and eager (uncompiled) blocks and log-prob pass.",
    "ours-default-compile-generation": "ours-default with the decode step torch.compile'd over a static KV cache, "
    "LoRA factors and attention as fused reductions (ppo.compile_generation; "
    "off in the default profile: its compile takes longer than a short run saves).",
    "ours-default-top15": "ours-default with LoRA adapters in the top 15 of 30 blocks only (ppo.trainable_top_layers): "
    "every backward stops at block 16 -- less capacity than adapters in every block, so not "
    "the same algorithmic content; not the reference configuration.",
    "ours-full-fp32": "Same algorithmic content as TRL (4 full models, full fine-tuning, fp32), eager.",
    "ours-full-bf16": "Full fine-tuning as TRL, bf16 autocast with fp32 master weights (TRL: fp32), eager.",
    "ours-lora-fp32": "LoRA as ours-default, fp32 as TRL, eager.",
    "rm": "The default profile's reward-model stage (params/default.yaml reward_model + common: blocks kept, LoRA, "
    "learning rates, trainable_top_layers, epochs, torch_compile) trained by its own loop (rlhf_lib.reward.fit): "
    "each pair packed in one row so its prompt runs once, and the frozen blocks below trainable_top_layers run "
    "once per training (a cache) instead of every epoch; the whole training is timed, the cache included.",
    "rm-trl": "The same RewardModelConfig on the same synthetic pairs trained by TRL's RewardTrainer "
    "(rlhf_lib.reward.train.reward_trainer: the stage's optimiser groups, schedule and clipping): chosen and "
    "rejected as separate sequences, every block run every step.",
    "rm-ensemble-score": "Scoring cost of a reward-model ensemble combined (rlhf_lib.reward.combined.MemberStack: "
    "the blocks below the lowest adapted one run once, then each of the --rm-ensemble-members members its own "
    "adapted top blocks, final norm and head) against scoring with one member's merged model (score_sequences); the "
    "default profile's reward model (trainable_top_layers, LoRA), members with random non-zero adapters and heads "
    "(no training), eager on both sides, the same right-padded batches of synthetic prompt+chosen and "
    "prompt+rejected sequences under the profile's dtype; the two timed alternately in one process. Not a comparison "
    "with TRL: TRL scores no ensembles.",
    "all-ours": "Exact speed-ups present in every config of ours: the rollout policy/value forward (with grad) "
    "doubles as the first PPO step's forward (TRL recomputes it); the LM head runs only on response "
    "positions; responses trimmed to the longest; fused chunked log-prob/entropy; the prompt tokens all "
    "rows share computed once per full-sequence forward (rlhf_lib.lm.prefix); eager attention for "
    "full-sequence forwards on CPU; our own decode loop (one uniform draw per row instead of "
    "torch.multinomial's one per vocabulary entry, no generate() bookkeeping). Pad token <|endoftext|> "
    "(distinct from EOS) on both sides.",
}

# the seed shape's configurations beside the table above (rlhf_lib.bench.shapes; `--shape seed`)
PPO_CONFIGS.update(bench_shapes.SEED_PPO_CONFIGS)
DIFFERENCES.update(bench_shapes.SEED_DIFFERENCES)
KNOWN_CONFIGS = (*PPO_CONFIGS, *RM_CONFIGS, *SCORING_CONFIGS)


@dataclass
class BenchSpec:
    """The workload, shared by every configuration and by the TRL driver."""

    model: str = "bundled:smollm2-135m-instruct"
    batch_size: int = 8
    response_length: int = 48
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    temperature: float = 0.7
    warmup: int = 2
    updates: int = 3
    threads: int = 2
    omp_wait_policy: str = "ACTIVE"  # OpenMP threads between parallel regions: ACTIVE spin (idle machine), PASSIVE
    #   sleep
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    rm_pairs_per_step: int = 8  # reward-model pairs per optimiser step (per_device_train_batch_size)
    rm_pairs: int = 96  # pairs of the timed reward-model training (the profile's num_train_epochs over them)
    rm_sequence_length: int = 150
    rm_ensemble_members: int = 4  # k of the ensemble rm-ensemble-score scores with
    probe_repeats: int = 25  # timed matmuls of the host probe before each measured process (0: no probe)
    shape: str = "default"  # the preset the workload came from (rlhf_lib.bench.shapes.SHAPES)
    extra: dict[str, Any] = field(default_factory=dict)


# the host probe's matmuls: label -> (torch dtype, n of an (n x n) @ (n x n) product); milliseconds each
def _bf16_probe_size() -> int:
    """The bf16 probe matmul's size: 2048 where the CPU has bf16 matrix instructions; 512 where bf16 is emulated
    (an order of magnitude slower than fp32 there, so a 2048^3 product would take most of a minute)."""
    from rlhf_lib.core.runtime import cpu_info

    return 2048 if cpu_info()[1] & {"amx_bf16", "avx512_bf16"} else 512


PROBE_MATMULS = {"bf16": ("bfloat16", _bf16_probe_size()), "fp32": ("float32", 1024)}


def bench_messages() -> list[list[dict[str, str]]]:
    """The benchmark's prompts (chat messages), the same on both sides."""
    return [[{"role": "user", "content": f"Write a short review of a {s}."}] for s in PROMPT_SUBJECTS]


def bench_prompts(tokenizer) -> list[list[int]]:
    """Prompt token ids with the chat template's generation prompt, exactly what both trainers condition on."""
    return [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
        for m in bench_messages()
    ]


def parse_configs(text: str) -> list[str]:
    """Comma-separated configuration names, checked against the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in KNOWN_CONFIGS]
    if bad or not names:
        raise ValueError(f"--configs: unknown {bad or names}; choose from {', '.join(KNOWN_CONFIGS)}")
    return names


def profile_ppo_fields(profile: str | Path = PROFILE) -> dict[str, Any]:
    """The PPOConfig fields a params profile gives its PPO stage (common + ppo sections, resolved), less the ones
    that name the run rather than the training (run, outputs_dir, overwrite, resume)."""
    from rlhf_lib.core import config

    fields = config.stage_parameters(config.load_params_file(repo_root() / profile), "ppo")
    return {k: v for k, v in fields.items() if k not in ("run", "outputs_dir", "overwrite", "resume")}


# the fields of a profile that name the run rather than the reward-model training
RM_RUN_FIELDS = ("run", "outputs_dir", "overwrite", "base_run")


def profile_reward_fields(profile: str | Path = PROFILE) -> dict[str, Any]:
    """The RewardModelConfig fields a params profile gives its reward-model stage (common + reward_model sections,
    resolved), less the ones that name the run rather than the training (:data:`RM_RUN_FIELDS`)."""
    from rlhf_lib.core import config

    fields = config.stage_parameters(config.load_params_file(repo_root() / profile), "reward_model")
    return {k: v for k, v in fields.items() if k not in RM_RUN_FIELDS}


def fit_to_model(fields: dict[str, Any], model_layers: int) -> dict[str, list[Any]]:
    """Change, in place, the reward-model fields a model of `model_layers` blocks cannot take; returns each changed
    field as [profile's value, value used].

    A model with fewer blocks than the profile keeps (a tiny test model) keeps all of them, and trains all of them
    when the profile trains more top blocks than it has. A profile's ensemble becomes one model: both trainers time
    one reward model (TRL trains no ensembles; the stage's members would each repeat the epochs on the shared trunk).
    """
    kept = 0 if fields["num_hidden_layers"] > model_layers else fields["num_hidden_layers"]
    top = 0 if fields["trainable_top_layers"] > (kept or model_layers) else fields["trainable_top_layers"]
    used = {"num_hidden_layers": kept, "trainable_top_layers": top, "ensemble": 1}
    changed = {k: [fields[k], v] for k, v in used.items() if fields[k] != v}
    fields.update(used)
    return changed


def reward_config(spec: BenchSpec, model_layers: int):
    """The RewardModelConfig both RM configurations train with: the default profile's, on the workload's model (of
    `model_layers` blocks; :func:`fit_to_model`), seed, threads, device and pairs per step.

    Returns the config and the fields changed from the profile's for the model (field -> [profile's, used])."""
    from rlhf_lib.reward import train as reward

    fields = profile_reward_fields() | {
        "model": spec.model,
        "base_model": "",  # the workload's model is the reward model's base
        "device": spec.device,
        "threads": spec.threads,
        "seed": spec.seed,
        "per_device_train_batch_size": spec.rm_pairs_per_step,
    }
    if spec.compile:
        fields["torch_compile"] = True
    changed = fit_to_model(fields, model_layers)
    return reward.RewardModelConfig(**fields), changed


def ppo_config(name: str, spec: BenchSpec):
    """The PPOConfig of configuration `name`: the default profile's, changed as PPO_CONFIGS says, on the workload."""
    from rlhf_lib.ppo import trainer as ppo

    fields = (
        profile_ppo_fields()
        | PPO_CONFIGS[name]
        | {
            "model": spec.model,
            "reward_model": spec.model,
            "device": spec.device,
            "threads": spec.threads,
            "seed": spec.seed,
            "batch_size": spec.batch_size,
            "total_episodes": spec.batch_size * (spec.warmup + spec.updates),
            "response_length": spec.response_length,
            "num_ppo_epochs": spec.num_ppo_epochs,
            "num_mini_batches": spec.num_mini_batches,
            "temperature": spec.temperature,
            "save_every": 0,
            "sample_every": 0,
        }
    )
    if spec.compile:
        fields["torch_compile"] = True
    return ppo.PPOConfig(**fields)


def spec_for_shape(shape: str, **given: Any) -> BenchSpec:
    """The BenchSpec of a shape (rlhf_lib.bench.shapes.SHAPES), with the `given` fields that are not None on top."""
    return BenchSpec(
        **{**bench_shapes.shape_fields(shape), "shape": shape, **{k: v for k, v in given.items() if v is not None}}
    )


def shape_configs(shape: str) -> tuple[str, ...]:
    """The configurations a shape measures by default (the seed shape: its reference, TRL's content, LoRA)."""
    return bench_shapes.SEED_CONFIGS if shape == "seed" else DEFAULT_CONFIGS
