"""Random-initialised models for throughput runs on machines the trained weights cannot reach.

A remote GPU machine that receives only the working tree (at most 64 MiB) and cannot reach the network gets no
bundled SmolLM2-135M GGUF (98 MB); only configs and tokenizer files travel, and this script rebuilds the models
there. Throughput depends on the shapes only: a random model almost never samples EOS, so every benchmark response
runs the full length, and no kernel's cost depends on the values.

    # a model folder's copy: same config and tokenizer, fresh weights (seeded)
    python scripts/random_init_model.py ~/.cache/rlhf-lab/smollm2-135m-instruct /tmp/smollm2-random
    python -m rlhf_lib.bench --device auto --model /tmp/smollm2-random --trl
    # the seed shape's GPT-2 124M (rlhf_lib.bench.shapes; --tiny: 2 layers x 64 for CPU dry runs)
    python scripts/random_init_model.py --gpt2 --tokenizer tiny:gpt2 /tmp/gpt2-random
    # tiny:llama and tiny:gpt2 into $RLHF_LAB_CACHE from SmolLM2's tokenizer folder (no GGUF needed)
    RLHF_LAB_CACHE=/tmp/rlhf-cache python scripts/random_init_model.py --tiny-refs --tokenizer /path/to/smollm2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # rlhf_lib from this checkout

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from rlhf_lib.bench import shapes as bench_shapes  # noqa: E402
from rlhf_lib.lm import models

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.safetensors.index.json", "*.py")  # not copied


def copy_with_fresh_weights(source: Path, dest: Path, seed: int) -> None:
    if not (source / "config.json").exists():
        raise SystemExit(f"{source}: no config.json (give a Hugging Face model folder)")
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"{dest} exists and is not empty: give a new folder (nothing was overwritten)")
    shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(dest)
    print(
        f"{dest}: random-initialised {type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (seed {seed})"
    )


def build_tiny_refs(tokenizer_dir: str) -> None:
    """models' own tiny builds, reading the tokenizer from a plain folder instead of the bundled GGUF."""
    if not (Path(tokenizer_dir) / "tokenizer_config.json").exists():
        raise SystemExit(f"--tokenizer {tokenizer_dir}: no tokenizer_config.json (give SmolLM2's tokenizer folder)")
    models._gguf_location = lambda ref: (tokenizer_dir, None)  # from_pretrained(folder, gguf_file=None): the folder
    for ref in models.TINY_MODELS:
        print(f"{ref}: {models.resolve_model_ref(ref)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", type=Path, help="SOURCE DEST (a copy), or DEST with --gpt2")
    p.add_argument("--gpt2", action="store_true", help="build the seed shape's GPT-2 124M into DEST")
    p.add_argument("--tiny", action="store_true", help="with --gpt2: 2 layers x 64 wide (CPU dry runs)")
    p.add_argument("--tiny-refs", action="store_true", help="build tiny:llama and tiny:gpt2 into $RLHF_LAB_CACHE")
    p.add_argument("--tokenizer", default="tiny:gpt2", help="tokenizer source (model reference or folder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.tiny_refs:
        build_tiny_refs(args.tokenizer)
    elif args.gpt2:
        if len(args.paths) != 1:
            raise SystemExit("--gpt2 takes one path: the new model folder")
        dest = bench_shapes.build_gpt2_random(args.paths[0], args.tokenizer, args.seed, tiny=args.tiny)
        config = AutoConfig.from_pretrained(dest)
        print(
            f"{dest}: random-initialised GPT-2, {config.n_layer} layers x {config.n_embd}, vocabulary "
            f"{config.vocab_size} (seed {args.seed})"
        )
    elif len(args.paths) == 2:
        copy_with_fresh_weights(*args.paths, args.seed)
    else:
        raise SystemExit("give SOURCE DEST, or --gpt2 DEST, or --tiny-refs --tokenizer FOLDER")


if __name__ == "__main__":
    main()
