"""A toy task with a known answer for the method tests: a 16-word vocabulary, a tiny random Llama policy, and a
reward that counts one target word. Small vocabulary, so the untrained policy samples the target often enough
(about 1 token in 16) for the group-baseline methods to get a signal within a few steps on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = ["<pad>", "<eos>", "<unk>"] + [chr(ord("a") + i) for i in range(13)]
TARGET = WORDS.index("k")  # the word the reward prefers
OTHER = WORDS.index("c")
PROMPTS = [
    "a b c",
    "d e",
    "f g h i",
    "j",
    "b d f",
    "m l",
    "a a",
    "e f g",
    "h",
    "i j k l",
    "c b",
    "g",
    "d",
    "l m",
    "a c e",
    "f",
]


def build_model(folder: Path, seed: int = 0) -> Path:
    """A HF folder (model + tokenizer) that models.load_tokenizer / load_causal_lm accept as a model reference."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.15,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def target_fraction(sequences: list[list[int]], response_length: int) -> np.ndarray:
    """Reward: share of the response slots holding the target word (the last response_length tokens at most)."""
    return np.array([sum(t == TARGET for t in s[-response_length:]) / response_length for s in sequences])


def write_data(data_dir: Path, tokenizer, n_pairs: int = 32, response_length: int = 4) -> None:
    """ppo_prompts / eval_prompts / train_pairs (chosen: the target word repeated; rejected: another word)."""
    data_dir.mkdir(parents=True, exist_ok=True)

    def prompt(i: int) -> dict:
        text = PROMPTS[i % len(PROMPTS)]
        return {
            "id": f"p{i}",
            "prompt": [{"role": "user", "content": text}],
            "prompt_text": text,
            "prompt_ids": tokenizer(text)["input_ids"],
        }

    rows = {"ppo_prompts": [prompt(i) for i in range(16)], "eval_prompts": [prompt(i) for i in range(16)]}
    rows["train_pairs"] = [
        {**prompt(i), "chosen_ids": [TARGET] * response_length + [1], "rejected_ids": [OTHER] * response_length + [1]}
        for i in range(n_pairs)
    ]
    for name, items in rows.items():
        with open(data_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in items)
    (data_dir / "report.json").write_text(json.dumps({"gold_scorer": None}))
