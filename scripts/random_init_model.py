"""A random-initialised copy of a model folder: same config, tokenizer and shapes, fresh weights (seeded).

For throughput runs where the trained weights cannot travel: the GPU figures in the README were measured on a lent
machine that receives at most 64 MiB and cannot reach the network, so the bundled SmolLM2-135M GGUF (98 MB) stayed
behind and this script rebuilt the model there from its config. Throughput depends on the shapes only: every
benchmark response runs the full 48 tokens with either weights (a random model almost never samples EOS, and the
trained one writes reviews longer than 48 tokens), and no kernel's cost depends on the values.

    python scripts/random_init_model.py ~/.cache/rlhf-lab/smollm2-135m-instruct /tmp/smollm2-random
    python -m rlhf_lib.bench --device auto --model /tmp/smollm2-random --trl
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.safetensors.index.json", "*.py")  # not copied


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="model folder (config.json + tokenizer files; weights not needed)")
    p.add_argument("dest", type=Path, help="new folder for the random-initialised model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not (args.source / "config.json").exists():
        raise SystemExit(f"{args.source}: no config.json (give a Hugging Face model folder)")
    if args.dest.exists() and any(args.dest.iterdir()):
        raise SystemExit(f"{args.dest} exists and is not empty: give a new folder (nothing was overwritten)")
    shutil.copytree(args.source, args.dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.source), dtype=torch.float32)
    model.save_pretrained(args.dest)
    print(f"{args.dest}: random-initialised {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (seed {args.seed})")


if __name__ == "__main__":
    main()
