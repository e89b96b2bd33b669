"""`make bench`: PPO and reward-model throughput, ours against TRL 1.12's PPOTrainer, measured side by side.

Workload (the one TRL 1.12's published figures describe): SmolLM2-135M-Instruct as policy, reference, reward and
value model (the reward/value score head is a random initialisation: no trained RM is needed for timing), batch 8,
48-token responses at T = 0.7, 4 PPO epochs, 1 minibatch, the same 12 review prompts on both sides. Every
configuration runs in its own subprocess, so its peak RSS is its own (read with ``os.wait4``); warm-up updates
(compiling included) are excluded from the figures.

    python -m rlhf_lib.bench                         # our configurations, ratios vs TRL's published figures
    python -m rlhf_lib.bench --trl                   # also TRL 1.12 in .venv-trl112 (created on first use)
    python -m rlhf_lib.bench --configs ours-default --updates 5 --warmup 2 --threads 1
    python -m rlhf_lib.bench --trl --omp-wait-policy PASSIVE   # threads sleep between ops (shared machines)
    python -m rlhf_lib.bench --shape seed --trl      # the seed profile's PPO shape (rlhf_lib.bench.shapes)
    python -m rlhf_lib.bench --shape seed --model tiny:gpt2 --warmup 0 --updates 1 --trl   # its CPU dry run

Configurations (``--configs``): every ``ours-*`` one is the default profile's PPO stage (``params/default.yaml``:
LoRA on policy and value, reference and reward = the adapter-off bases, dtype auto, compiled transformer blocks) on
this workload, with the changes :data:`rlhf_lib.bench.configs.PPO_CONFIGS` lists. ``ours-default`` changes nothing:
it is the reference configuration of the ``*_ratio_vs_trl`` keys. ``ours-full-fp32`` has TRL's algorithmic content
(four full models, full fine-tuning, fp32). ``rm`` times the default profile's reward-model stage (its
``reward_model`` settings, :func:`rlhf_lib.bench.configs.reward_config`) trained by our loop, ``rm-trl`` the same
RewardModelConfig trained by TRL's RewardTrainer, both on the same synthetic ~150-token pairs: a whole training of
``--rm-pairs`` pairs each (the trunk cache of our loop included), after a one-epoch warm-up. ``rm-ensemble-score``
(not in the default list) times scoring those pairs' sequences with that reward model as an ensemble of
``--rm-ensemble-members`` members combined (:class:`rlhf_lib.reward.combined.MemberStack`) against one member alone,
the two alternating in one process (``rm_ensemble_cost_ratio``). Every process, TRL's
too, runs with the same ``OMP_WAIT_POLICY`` (``--omp-wait-policy``; see :func:`child_env`). Before each measured
process a host probe times fixed bf16 and fp32 matmuls (``--probe-repeats``;
:func:`rlhf_lib.bench.workers.run_host_probe`): their median times say how contended the host was for that run,
which the load average does not show on a shared machine.
Shapes (``--shape``; :mod:`rlhf_lib.bench.shapes`): ``default`` is the workload above, ``seed`` the seed profile's
(GPT-2 124M sizes, random weights, batch 64, 4 minibatches, 64-token responses; reference configuration
``ours-seed``); bench.json's ``gpu`` section holds the figures a GPU run is read for.
Device auto: CUDA with bf16 when present, else CPU. Output: a table on stdout, ``<out>/bench.json`` and
``<out>/bench.png`` (the table as a figure: :func:`rlhf_lib.bench.plots.plot_bench`).

This module is the driver and the command line: it runs each configuration (and TRL) in its own subprocess and
writes bench.json. The workload and configurations are in :mod:`rlhf_lib.bench.configs`, what a measured subprocess
runs in :mod:`rlhf_lib.bench.workers`, the figures, ratios and table in :mod:`rlhf_lib.bench.report`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from rlhf_lib.bench import shapes as bench_shapes
from rlhf_lib.bench.configs import (
    DIFFERENCES,
    FULL_FT_LR,
    KNOWN_CONFIGS,
    PROMPT_SUBJECTS,
    PUBLISHED_TRL,
    REFERENCE_CONFIG,
    RM_CONFIGS,
    SCORING_CONFIGS,
    TRL_CONFIG_NAME,
    BenchSpec,
    bench_prompts,
    parse_configs,
    shape_configs,
    spec_for_shape,
)
from rlhf_lib.bench.report import add_ratios, format_table, merge_rounds
from rlhf_lib.bench.workers import PROBE_WORKER, RESULT_MARKER, worker_main
from rlhf_lib.core.io import repo_root

TRL_ENV = ".venv-trl112"
TRL_REQUIREMENTS = (
    "torch==2.13.0",
    "trl==1.12.0",
    "transformers==5.23.0",
    "accelerate==1.15.0",
    "peft==0.21.2",
    "datasets==5.2.0",
)


def parse_result(stdout: str) -> dict[str, Any]:
    """The JSON payload of the last result line in a worker's stdout (marker line, else the last JSON line)."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no result line in the worker's output")


def probe_host(spec: BenchSpec, timeout: float = 120) -> dict[str, Any] | None:
    """:func:`run_host_probe` in a subprocess with the measured processes' environment; None when disabled."""
    if spec.probe_repeats < 1:
        return None
    cmd = [sys.executable, "-m", "rlhf_lib.bench", "--worker", PROBE_WORKER, "--spec", json.dumps(asdict(spec))]
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=child_env(spec.threads, spec.omp_wait_policy),
            cwd=repo_root(),
            timeout=timeout,
        )
        if done.returncode != 0:
            return {"error": f"exit status {done.returncode}: {done.stderr.strip()[-300:]}"}
        return parse_result(done.stdout)
    except (subprocess.TimeoutExpired, ValueError) as exc:
        return {"error": str(exc)}


# ----------------------------------------------------------------------------------------------------------------
# the driver


def child_env(threads: int, omp_wait_policy: str) -> dict[str, str]:
    """Environment of a measured subprocess (TRL's too): thread count and OpenMP wait policy.

    Decoding a small batch runs thousands of tiny parallel regions per step; with PASSIVE waits the second thread
    sleeps between them and is woken by the kernel each time, which makes decoding slower on an idle machine.
    ACTIVE busy-waits instead, which is right on an idle machine and slows everything down when another process
    wants the same cores -- hence PASSIVE for `make pipeline` / `make test` on shared machines.
    """
    env = dict(os.environ)
    env.pop("GOMP_SPINCOUNT", None)  # the policy alone decides how long idle threads spin
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": omp_wait_policy,
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def run_subprocess(cmd: list[str], spec: BenchSpec, log_path: Path, timeout: float) -> dict[str, Any]:
    """Run `cmd`, stdout to `log_path`, stderr through; returns the result plus the child's own peak RSS and the
    host probe taken just before it."""
    probe = probe_host(spec)
    load_before = os.getloadavg()
    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        env = child_env(spec.threads, spec.omp_wait_policy)
        proc = subprocess.Popen(cmd, stdout=log, stderr=None, env=env, cwd=repo_root())
        while True:  # os.wait4: this child's rusage (peak RSS of this configuration alone)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = log_path.read_text(encoding="utf-8")
    meta = {
        "wall_s": time.perf_counter() - start,
        "child_peak_rss_gib": usage.ru_maxrss / 2**20,
        # kernel time and page faults of the whole process (warm-up and compiling included): allocator effects
        "child_cpu_user_s": round(usage.ru_utime, 2),
        "child_cpu_sys_s": round(usage.ru_stime, 2),
        "child_minor_page_faults": usage.ru_minflt,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": shlex.join(cmd),
        "log": str(log_path),
        "host_probe_before": probe,
    }
    if proc.returncode != 0:
        tail = "\n".join(stdout.splitlines()[-5:])
        return {"error": f"exit status {proc.returncode} (see {log_path} and stderr above): {tail}", **meta}
    try:
        return {**parse_result(stdout), **meta}
    except ValueError as exc:
        return {"error": str(exc), **meta}


def trl_python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def ensure_trl_env(env_dir: Path) -> Path:
    """Create the separate TRL 1.12 virtualenv once (pip from the registry); returns its python."""
    python = trl_python(env_dir)
    stamp = env_dir / ".rlhf-bench-installed"
    if stamp.exists() and python.exists():
        return python
    print(f"creating {env_dir} with {' '.join(TRL_REQUIREMENTS)} (once; a few minutes)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], check=True)
    stamp.write_text(" ".join(TRL_REQUIREMENTS) + "\n")
    return python


def run_trl(spec: BenchSpec, out_dir: Path, env_dir: Path, timeout: float, logs: Path | None = None) -> dict[str, Any]:
    """TRL 1.12's PPOTrainer on the same workload in its own environment and subprocess."""
    from rlhf_lib.lm import models

    try:
        python = ensure_trl_env(env_dir)
    except (subprocess.CalledProcessError, OSError) as exc:
        return {"name": TRL_CONFIG_NAME, "error": f"could not create {env_dir}: {exc}"}
    tokenizer = models.load_tokenizer(spec.model)
    prompts_file = out_dir / "trl_prompts.json"
    prompts_file.write_text(json.dumps(bench_prompts(tokenizer)))
    cmd = [
        str(python),
        str(repo_root() / "scripts" / "bench_trl112.py"),
        "--model-dir",
        models.resolve_model_ref(spec.model),
        "--prompts",
        str(prompts_file),
        "--pad-token",
        tokenizer.pad_token,
        "--batch-size",
        str(spec.batch_size),
        "--response-length",
        str(spec.response_length),
        "--num-ppo-epochs",
        str(spec.num_ppo_epochs),
        "--num-mini-batches",
        str(spec.num_mini_batches),
        "--temperature",
        str(spec.temperature),
        "--learning-rate",
        str(FULL_FT_LR),
        "--warmup",
        str(spec.warmup),
        "--updates",
        str(spec.updates),
        "--threads",
        str(spec.threads),
        "--seed",
        str(spec.seed),
        "--device",
        spec.device,
    ]
    print(f"\n== {TRL_CONFIG_NAME} ({python})", flush=True)
    result = run_subprocess(cmd, spec, (logs or out_dir / "logs") / f"{TRL_CONFIG_NAME}.log", timeout)
    result.setdefault("name", TRL_CONFIG_NAME)
    return result


def _report_header(spec: BenchSpec, rounds: int) -> dict[str, Any]:
    """bench.json before any result: when, the command, device, threads, workload, versions, TRL's published row."""
    from rlhf_lib.core import runtime
    from rlhf_lib.core.runs import package_versions

    device = runtime.pick_device(spec.device)
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "rlhf_lib.bench", *sys.argv[1:]]),
        "device": runtime.describe_device(device) | {"torch_threads": spec.threads},
        "threads": spec.threads,
        "omp_wait_policy": spec.omp_wait_policy,
        "rounds": rounds,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "workload": {k: v for k, v in asdict(spec).items() if k != "extra"}
        | {
            "models": "policy + reference + reward + value from the same checkpoint; reward/value score head is a "
            "random initialisation (from_pretrained num_labels=1)",
            "prompts": len(PROMPT_SUBJECTS),
            "full_fine_tuning_learning_rate": FULL_FT_LR,
        },
        "reference_config": bench_shapes.reference_config(spec.shape, REFERENCE_CONFIG),
        "differences": DIFFERENCES,
        "versions": package_versions(),
        "configs": {},
        "trl": None,
        "published_trl": PUBLISHED_TRL,
    }


def run_benchmark(
    configs: Sequence[str],
    spec: BenchSpec,
    out_dir: Path,
    with_trl: bool,
    trl_env: Path,
    timeout: float,
    rounds: int = 1,
) -> dict[str, Any]:
    """Every configuration in its own subprocess, then TRL (optional), `rounds` times over (ours and TRL take turns,
    so a slow spell of a shared machine falls on both); returns the report (also written to JSON)."""
    from rlhf_lib.core.io import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    report = _report_header(spec, rounds)
    spec_json = json.dumps(asdict(spec))
    per_round: dict[str, list[dict[str, Any]]] = {}
    for round_index in range(rounds):
        logs = out_dir / "logs" / (f"round{round_index + 1}" if rounds > 1 else "")
        for name in configs:
            print(f"\n== {name}" + (f" (round {round_index + 1}/{rounds})" if rounds > 1 else ""), flush=True)
            cmd = [sys.executable, "-m", "rlhf_lib.bench", "--worker", name, "--spec", spec_json]
            result = run_subprocess(cmd, spec, logs / f"{name}.log", timeout)
            result.setdefault("name", name)
            kind = "reward_model" if name in RM_CONFIGS else "reward_scoring" if name in SCORING_CONFIGS else "ppo"
            result.setdefault("kind", kind)
            if name in RM_CONFIGS:  # a failed worker's result names its trainer (scorer) too
                result.setdefault("trainer", RM_CONFIGS[name])
            if name in SCORING_CONFIGS:
                result.setdefault("scorer", SCORING_CONFIGS[name])
            per_round.setdefault(name, []).append(result)
        if with_trl:
            per_round.setdefault(TRL_CONFIG_NAME, []).append(run_trl(spec, out_dir, trl_env, timeout, logs))
    for name, results in per_round.items():
        merged = merge_rounds(results, spec.warmup, spec.batch_size)
        if name == TRL_CONFIG_NAME:
            report["trl"] = merged
        else:
            report["configs"][name] = merged
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    add_ratios(report)
    report["gpu"] = bench_shapes.gpu_section(report)
    write_json_atomic(out_dir / "bench.json", report)
    return report


def _add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that change the workload (BenchSpec fields over the shape's)."""
    p.add_argument(
        "--model",
        default=None,
        help="model reference (all four roles; default: the shape's, e.g. "
        "tiny:gpt2 for a CPU dry run of the seed shape)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA + bf16 when present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--response-length", type=int, default=None)
    p.add_argument("--num-ppo-epochs", type=int, default=None)
    p.add_argument("--num-mini-batches", type=int, default=None)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (ppo.torch_compile / reward_model.torch_compile)",
    )
    p.add_argument(
        "--rm-pairs",
        type=int,
        default=None,
        help=f"pairs of each RM configuration's timed training (default {BenchSpec.rm_pairs})",
    )
    p.add_argument(
        "--rm-pairs-per-step",
        type=int,
        default=None,
        help=f"pairs per RM optimiser step, the workload's batch (default {BenchSpec.rm_pairs_per_step})",
    )
    p.add_argument(
        "--rm-ensemble-members",
        type=int,
        default=None,
        help=f"members of the ensemble rm-ensemble-score scores with (default {BenchSpec.rm_ensemble_members})",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlhf_lib.bench", description=__doc__.split("\n")[0])
    p.add_argument("--updates", type=int, default=3, help="timed PPO updates per configuration")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="warm-up updates run first and excluded from the figures (RM: the warm-up training's steps)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads of every measured process")
    p.add_argument(
        "--omp-wait-policy",
        default=BenchSpec.omp_wait_policy,
        choices=("ACTIVE", "PASSIVE"),
        help="OMP_WAIT_POLICY of every measured process, TRL's too: ACTIVE (spinning threads, for an idle "
        "machine) or PASSIVE (sleeping threads, safe when other jobs share the cores)",
    )
    p.add_argument(
        "--shape",
        default="default",
        choices=tuple(bench_shapes.SHAPES),
        help="workload preset: default (SmolLM2, batch 8) or seed (the seed profile's PPO: GPT-2-sized, "
        "batch 64, 4 minibatches, 64-token responses); the flags below override its fields",
    )
    p.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated, of {', '.join(KNOWN_CONFIGS)} (default: the shape's own list)",
    )
    p.add_argument("--trl", action="store_true", help=f"also run TRL 1.12's PPOTrainer in {TRL_ENV} (created once)")
    p.add_argument("--trl-env", default=TRL_ENV, help="folder of the TRL 1.12 virtualenv")
    p.add_argument("--out", default="outputs/bench", help="folder for bench.json and the worker logs")
    _add_workload_arguments(p)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every configuration (and TRL) this many times, "
        "taking turns, and pool the timed updates (a shared machine's slow spells fall on both sides)",
    )
    p.add_argument(
        "--probe-repeats",
        type=int,
        default=BenchSpec.probe_repeats,
        help="timed matmuls of the host probe run before each measured process (0: no probe)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a configuration's process is killed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, BenchSpec(**json.loads(args.spec)))
        return None
    try:
        configs = parse_configs(args.configs or ",".join(shape_configs(args.shape)))
    except ValueError as exc:
        raise SystemExit(str(exc))
    if args.updates < 1 or args.warmup < 0 or args.threads < 1 or args.rounds < 1 or args.probe_repeats < 0:
        raise SystemExit("--updates and --rounds must be >= 1, --warmup and --probe-repeats >= 0, --threads >= 1")
    if any(n is not None and n < 1 for n in (args.rm_pairs, args.rm_pairs_per_step, args.rm_ensemble_members)):
        raise SystemExit("--rm-pairs, --rm-pairs-per-step and --rm-ensemble-members must be >= 1")
    spec = spec_for_shape(
        args.shape,
        model=args.model,
        batch_size=args.batch_size,
        response_length=args.response_length,
        num_ppo_epochs=args.num_ppo_epochs,
        num_mini_batches=args.num_mini_batches,
        warmup=args.warmup,
        updates=args.updates,
        threads=args.threads,
        omp_wait_policy=args.omp_wait_policy,
        device=args.device,
        compile=args.compile,
        probe_repeats=args.probe_repeats,
        rm_pairs=args.rm_pairs,
        rm_pairs_per_step=args.rm_pairs_per_step,
        rm_ensemble_members=args.rm_ensemble_members,
    )
    spec.model = bench_shapes.ensure_seed_model(spec.model)
    root = repo_root()
    out_dir = Path(args.out) if Path(args.out).is_absolute() else root / args.out
    trl_env = Path(args.trl_env) if Path(args.trl_env).is_absolute() else root / args.trl_env
    report = run_benchmark(configs, spec, out_dir, args.trl, trl_env, args.timeout, args.rounds)
    print("\n" + format_table(report))
    from rlhf_lib.bench.plots import plot_bench
    from rlhf_lib.core.figures import save_figure_in

    png = save_figure_in(plot_bench(report), out_dir, "bench")
    print(
        f"\nwrote {png} and {out_dir / 'bench.json'} (device {report['device']}, threads {spec.threads}, load average "
        f"{report['load_average_start']} -> {report['load_average_end']})"
    )
    return report
