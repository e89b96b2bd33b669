#!/usr/bin/env bash
# One prepared GPU check: the CUDA-marked tests, then the bench's seed shape and default shape (ours against TRL 1.12
# in the same invocation), in under 8 minutes, writing JSON + figures into $OUT. Results belong in docs/gpu/
# (the seed shape's JSON as docs/gpu/bench-seed-shape.json; see docs/gpu/README.md).
#
# What travels: a remote GPU machine gets only the working tree (<= 64 MiB) and cannot reach any registry. Its python3
# holds torch (CUDA), accelerate, numpy, pyyaml, matplotlib, pytest and pytest-xdist, but not trl, datasets, dill or
# multiprocess, and an older transformers; and the SmolLM2 weights (98 MB GGUF) cannot travel. So, once, on a
# machine with PyPI (the CPU host):
#
#   scripts/device_check.sh prepare
#
# fills the carry folder (CARRY_DIR, default .cache/device-carry -- inside .cache/, which .gitignore ignores, so it
# travels only when named in the device call's carry list) with:
#   wheels/    transformers 5.23.0, trl 1.16.0, peft 0.21.2, datasets 5.2.0, dill, multiprocess (ours, installed with
#              --target /tmp/site) and trl 1.12.0 (TRL's side, in its own --target folder): ~17 MB
#   smollm2/   SmolLM2-135M-Instruct's config and tokenizer files without weights: ~3.5 MB
# Then the device call (the device tool's `run`): carry [".cache/device-carry"], timeout_s 560, command
#
#   bash scripts/device_check.sh
#
# On the machine every model is rebuilt from configs with random weights (scripts/random_init_model.py): tiny:llama
# and tiny:gpt2 for the tests, GPT-2 124M for the seed shape, SmolLM2-135M for the default shape. Each step has its
# own timeout inside a total budget (BUDGET_S, default 470 s), so a hang in one step still leaves the others'
# results; a step that would start with too little budget left is recorded as skipped.
#
# CPU rehearsal of the same steps (tiny models, 1 update, CPU; the tests then skip, TRL 1.12 still runs):
#
#   CARRY_DIR=/tmp/carry scripts/device_check.sh prepare
#   DRY_RUN=1 CARRY_DIR=/tmp/carry OUT=/tmp/device-out PYTHON=.venv/bin/python scripts/device_check.sh
#
# $OUT gets (at most 8 files, the device tool's limit): device-check.json (environment, each step's status and
# seconds, test counts, both shapes' GPU sections), device-check.log (every step's log, tails), cuda-tests.xml,
# bench-seed-shape.json / .png, bench-default-shape.json / .png.
set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CARRY=$(realpath -m "${CARRY_DIR:-.cache/device-carry}")
DRY_RUN=${DRY_RUN:-0}
WHEELS=(transformers==5.23.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.12.0)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi

prepare() {
    mkdir -p "$CARRY/wheels" "$CARRY/smollm2"
    for w in "${WHEELS[@]}"; do  # one at a time: the two trl versions may not share a resolver run
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$CARRY/wheels" "$w" || { echo "prepare: pip download $w failed" >&2; exit 1; }
    done
    local src
    src=$(PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 "$PY" -c \
        "from rlhf_lib.lm import models; print(models.resolve_model_ref('bundled:smollm2-135m-instruct'))") || exit 1
    (cd "$src" && cp config.json generation_config.json tokenizer* special_tokens_map.json chat_template.jinja \
        "$CARRY/smollm2/" 2>/dev/null)
    [ -f "$CARRY/smollm2/tokenizer_config.json" ] || { echo "prepare: no tokenizer files in $src" >&2; exit 1; }
    du -sh "$CARRY" "$CARRY"/*
}

if [ "${1:-run}" = "prepare" ]; then prepare; exit 0; fi
[ -d "$CARRY/wheels" ] && [ -d "$CARRY/smollm2" ] || {
    echo "device_check: $CARRY has no wheels/ or smollm2/: run 'scripts/device_check.sh prepare' on a machine with PyPI first, and carry it" >&2
    exit 2; }
: "${OUT:?device_check: set OUT to the folder for the results (the device tool sets it)}"
mkdir -p "$OUT"
WORK=${WORK_DIR:-$(mktemp -d /tmp/device-check.XXXX)}
mkdir -p "$WORK/logs"
BUDGET=${BUDGET_S:-470}
START=$(date +%s)
STEPS="$WORK/steps.tsv"
: >"$STEPS"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RLHF_LAB_CACHE="$WORK/cache"

# step NAME SECONDS CMD...: run CMD with a timeout of min(SECONDS, budget left), log to $WORK/logs/NAME.log
step() {
    local name=$1 want=$2 left t0 rc
    shift 2
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 30 ]; then
        printf '%s\tskipped\t0\t0\tbudget spent\n' "$name" >>"$STEPS"
        echo "== $name: skipped (budget spent)"
        return 1
    fi
    [ "$want" -gt "$left" ] && want=$left
    echo "== $name (timeout ${want}s)"
    t0=$(date +%s)
    timeout --kill-after=15 "$want" bash -c '"$@"' _ "$@" >"$WORK/logs/$name.log" 2>&1  # functions: exported below
    rc=$?
    local status=ok
    [ $rc -ne 0 ] && status=failed
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$want" >>"$STEPS"
    tail -n 3 "$WORK/logs/$name.log"
    return $rc
}

setup() {
    if [ "$DRY_RUN" != 1 ]; then  # ours: the carried wheels ahead of the machine's own packages
        ls "$CARRY"/wheels/*.whl | grep -v 'trl-1\.12\.' | xargs "$PY" -m pip install -q --no-index --no-deps \
            --no-compile --no-cache-dir --upgrade --target /tmp/site || return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/trl112" \
        "$CARRY"/wheels/trl-1.12.*.whl || return 1
    # TRL's "virtualenv" for rlhf_lib.bench --trl-env: the same python with trl 1.12 first on the path
    mkdir -p "$WORK/trlenv/bin"
    printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" "$@"\n' "$WORK/trl112" "$(command -v "$PY")" \
        >"$WORK/trlenv/bin/python"
    chmod +x "$WORK/trlenv/bin/python"
    echo "trl 1.12 from $WORK/trl112 (device_check.sh)" >"$WORK/trlenv/.rlhf-bench-installed"
    "$PY" - "$WORK/environment.json" <<'EOF'
import json, platform, sys
import torch, transformers, trl
info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
EOF
    "$WORK/trlenv/bin/python" -c "import trl; assert trl.__version__ == '1.12.0', trl.__version__; print('TRL side: trl', trl.__version__)"
}

models() {
    local tiny=""
    [ "$DRY_RUN" = 1 ] && tiny=--tiny
    "$PY" scripts/random_init_model.py --tiny-refs --tokenizer "$CARRY/smollm2" &&
        "$PY" scripts/random_init_model.py --gpt2 $tiny --tokenizer "$RLHF_LAB_CACHE/tiny-gpt2" "$WORK/gpt2-random" &&
        if [ "$DRY_RUN" != 1 ]; then "$PY" scripts/random_init_model.py "$CARRY/smollm2" "$WORK/smollm2-random"; fi
}

cuda_tests() {
    local par=()
    [ "$DRY_RUN" != 1 ] && "$PY" -c "import xdist" 2>/dev/null && par=(-n 4)
    "$PY" -m pytest -q -rfEs -m cuda -p no:cacheprovider "${par[@]}" --junitxml="$WORK/cuda-tests.xml" tests/test_cuda.py
}

# bench SHAPE MODEL CONFIGS PER_CONFIG_TIMEOUT WARMUP UPDATES
bench() {
    local dev=()
    [ "$DRY_RUN" = 1 ] && dev=(--device cpu --threads 1 --omp-wait-policy PASSIVE)
    "$PY" -m rlhf_lib.bench --shape "$1" --model "$2" --configs "$3" --timeout "$4" --warmup "$5" --updates "$6" \
        --trl --trl-env "$WORK/trlenv" --probe-repeats 0 --threads 4 "${dev[@]}" --out "$WORK/bench-$1"
}

export -f setup models cuda_tests bench
export CARRY DRY_RUN PY WORK
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ "$DRY_RUN" != 1 ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
if [ "$DRY_RUN" = 1 ]; then
    SEED_CONFIGS=${SEED_CONFIGS:-ours-seed}; DEFAULT_CONFIGS=${DEFAULT_CONFIGS:-ours-full-fp32}
    SEED_RUN=(0 1); DEFAULT_RUN=(0 1); DEFAULT_MODEL=tiny:llama; PER=${PER_CONFIG_S:-420}; BUDGET=${BUDGET_S:-1500}
else
    SEED_CONFIGS=${SEED_CONFIGS:-ours-seed,ours-full-fp32}
    DEFAULT_CONFIGS=${DEFAULT_CONFIGS:-ours-full-fp32}
    SEED_RUN=(2 3); DEFAULT_RUN=(1 3); DEFAULT_MODEL=$WORK/smollm2-random; PER=${PER_CONFIG_S:-160}
fi
n_seed=$(($(echo "$SEED_CONFIGS" | tr ',' '\n' | wc -l) + 1))
n_default=$(($(echo "$DEFAULT_CONFIGS" | tr ',' '\n' | wc -l) + 1))

step setup 90 setup && step models 120 models && {
    step cuda_tests "${TESTS_S:-130}" cuda_tests
    step bench_seed $((n_seed * PER + 30)) bench seed "$WORK/gpt2-random" "$SEED_CONFIGS" "$PER" "${SEED_RUN[@]}"
    step bench_default $((n_default * PER + 30)) bench default "$DEFAULT_MODEL" "$DEFAULT_CONFIGS" "$PER" "${DEFAULT_RUN[@]}"
}

"$PY" - "$WORK" "$OUT" "$DRY_RUN" <<'EOF'
import json, shutil, sys, xml.etree.ElementTree as ET
from pathlib import Path

work, out, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
steps = [dict(zip(("step", "status", "exit_status", "seconds", "timeout_s"), line.split("\t")))
         for line in (work / "steps.tsv").read_text().splitlines() if line]
summary = {"dry_run": dry, "steps": steps, "environment": None, "cuda_tests": None, "shapes": {}}
if (work / "environment.json").exists():
    summary["environment"] = json.loads((work / "environment.json").read_text())
xml = work / "cuda-tests.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase")
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in cases if c.find("failure") is not None
              or c.find("error") is not None]
    summary["cuda_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
        "failed": failed}
    shutil.copy(xml, out / "cuda-tests.xml")
for shape in ("seed", "default"):
    folder = work / f"bench-{shape}"
    if (folder / "bench.json").exists():
        report = json.loads((folder / "bench.json").read_text())
        summary["shapes"][shape] = report.get("gpu")
        shutil.copy(folder / "bench.json", out / f"bench-{shape}-shape.json")
    if (folder / "bench.png").exists():
        shutil.copy(folder / "bench.png", out / f"bench-{shape}-shape.png")
(out / "device-check.json").write_text(json.dumps(summary, indent=1, default=str))
with open(out / "device-check.log", "w", encoding="utf-8") as log:
    for path in sorted((work / "logs").glob("*.log")) + sorted((work / "bench-seed" / "logs").glob("*.log")) + sorted(
            (work / "bench-default" / "logs").glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        log.write(f"===== {path.relative_to(work)} ({len(lines)} lines, last 150)\n" + "\n".join(lines[-150:]) + "\n")
print(json.dumps({k: summary[k] for k in ("steps", "cuda_tests")}, indent=1))
for shape, gpu in summary["shapes"].items():
    if gpu:
        print(shape, {k: gpu.get(k) for k in ("device_name", "episodes_per_s_ratio_vs_trl", "peak_gpu_ratio_vs_trl",
                                              "meets_targets")})
EOF
echo "device_check: $(($(date +%s) - START)) s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
