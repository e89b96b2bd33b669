"""PPO's rollout sampler: a small decode loop of our own instead of ``model.generate``.

Same distribution as ``generate(do_sample=True, temperature=T, top_k=0, top_p=1.0)`` -- pure sampling from
softmax(logits / T), a row that emitted EOS gets pad from then on, the loop stops when every row has stopped or at
``max_new_tokens`` -- but cheaper per step on a CPU:

- inverse-CDF sampling draws one uniform number per row; ``torch.multinomial`` draws one exponential per vocabulary
  entry;
- no logits processors, stopping criteria or per-step bookkeeping of ``generate``;
- ``compile=True``: the one-token decode step runs as one ``torch.compile`` graph over a preallocated (static) KV
  cache, which fuses the many small elementwise ops of a small-batch step. Inside that graph LoRA's factors
  (:func:`lora_factors_as_reductions`) and attention (:func:`decode_attention`) run as fused reductions instead of
  many tiny matmul / SDPA calls, and steps after a call's first skip Dynamo's guard checks. The graph has symbolic
  batch and cache sizes (``dynamic=True``), so one graph serves every prompt width and batch; it is built on the
  first call (inductor's on-disk cache shortens later runs), which pays off only over long runs.

The reference for correctness is teacher forcing: the log-probabilities the loop sampled from equal the ones a
full-sequence forward of the same tokens gives (tests/test_generation.py, left padding included).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from rlhf_lib.lm import models


def sample_from_logits(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row drawn from softmax(logits / temperature): (B, V) -> (B,).

    Inverse-CDF sampling: a float64 running sum of the probabilities (exact to ~1e-16 over 50k entries) and one
    uniform draw per row; a token of probability 0 has an empty interval and is never drawn.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V), as generate(): float32 logits / T
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    u = torch.rand((cdf.shape[0], 1), dtype=torch.float64, device=cdf.device, generator=generator)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first index whose cdf exceeds u (B, 1)
    return tokens.clamp_(max=cdf.shape[1] - 1).squeeze(1)


def static_cache(model: nn.Module, max_cache_len: int, dtype: torch.dtype | None):
    """A transformers StaticCache whose full-attention layers store keys and values in `dtype` (None: as given).

    Under autocast, Llama's keys come out of the rotary embedding in fp32 while its values are bf16, and the
    stock StaticCache (one dtype per layer) refuses that. Attention consumes both in the autocast dtype anyway, so
    casting when storing changes no number. Returns None when the model has layer types other than plain full
    attention (sliding windows, linear attention): the caller then uses a dynamic cache.
    """
    cache = StaticCache(config=models.peft_base(model).config, max_cache_len=max_cache_len)
    if any(type(layer) is not StaticLayer for layer in cache.layers):
        return None
    if dtype is not None:
        for layer in cache.layers:
            layer.__class__ = _CastingStaticLayer
            layer.store_dtype = dtype
    return cache


class _CastingStaticLayer(StaticLayer):
    """StaticLayer that casts incoming keys/values to ``store_dtype`` (set per instance by :func:`static_cache`)."""

    store_dtype: torch.dtype

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states.to(self.store_dtype), value_states.to(self.store_dtype))

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
        return super().update(key_states.to(self.store_dtype), value_states.to(self.store_dtype), *args, **kwargs)


def _linear_as_reduction(module: nn.Linear, x: Tensor) -> Tensor:
    """``module(x)`` written as a multiply-and-sum that inductor fuses into its own loop (no bias; LoRA factors).

    Same arithmetic as autocast's linear: inputs rounded to the autocast dtype, exact products and a float32 sum,
    output rounded to the autocast dtype -- only the summation order differs.
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    w = module.weight.to(dtype).float()  # (out, in)
    return (x.to(dtype).float()[..., None, :] * w).sum(-1).to(dtype)  # (..., out)


@contextlib.contextmanager
def lora_factors_as_reductions(model: nn.Module):
    """Inside the ``with`` block, LoRA's A and B factors run as :func:`_linear_as_reduction` instead of matmul calls.

    In a small-batch decode step the low-rank factors are 4 tiny matmuls per layer, each costing a oneDNN dispatch
    for a few thousand multiply-adds; as reductions inductor fuses them with the surrounding elementwise kernels.
    Only for compiled decode steps (eager, the loop would be slower). Restores the modules on exit.
    """
    patched = []
    for module in model.modules():
        for name in ("lora_A", "lora_B"):
            factors = getattr(module, name, None)
            if isinstance(factors, nn.ModuleDict):
                for linear in factors.values():
                    if isinstance(linear, nn.Linear) and linear.bias is None and "forward" not in vars(linear):
                        linear.forward = _linear_as_reduction.__get__(linear)  # type: ignore[method-assign]
                        patched.append(linear)
    try:
        yield len(patched)
    finally:
        for linear in patched:
            del linear.forward


DECODE_ATTENTION = "rlhf_decode"  # the attention implementation name registered with transformers (compiled decode)


def decode_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function for a one-token decode step, as elementwise products and sums that inductor
    fuses into a few loops of the compiled step, instead of an SDPA call per layer.

    In a small-batch decode step each layer's SDPA call (plus the grouped-query key/value expansion it needs) is a
    separate kernel for a tiny product. Same maths: scores, softmax and the weighted sum
    of values in float32 (SDPA's CPU kernel accumulates in float32 too), output in the query's dtype; grouped-query
    heads read their shared key/value head without copying it. Anything else -- several query tokens (prefill),
    dropout, sliding windows, soft-capping, attention sinks -- goes to transformers' SDPA function unchanged.
    query (B, H, 1, D), key / value (B, Hkv, L, D), attention_mask: (B, 1, 1, L) boolean (True: attend), additive
    float, or None. Returns (B, 1, H, D) like transformers' attention functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = any(kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux"))
    if query.shape[2] != 1 or dropout or special:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    B, H, _, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    scale = D**-0.5 if scaling is None else scaling
    q = query.reshape(B, Hkv, H // Hkv, 1, D).float()  # (B, Hkv, G, 1, D): G query heads share a key/value head
    scores = (q * key.float()[:, :, None]).sum(-1) * scale  # (B, Hkv, G, L)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, -L:].reshape(B, 1, 1, L)  # (B, 1, 1, L), the last query row
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1)  # (B, Hkv, G, L)
    out = (probs[..., None] * value.float()[:, :, None]).sum(-2)  # (B, Hkv, G, D)
    return out.to(query.dtype).reshape(B, H, 1, D).transpose(1, 2), None  # (B, 1, H, D)


def register_decode_attention() -> None:
    """Make :data:`DECODE_ATTENTION` a transformers attention implementation, with SDPA's boolean masks
    (idempotent; done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)


register_decode_attention()


DECODE_MODES = ("auto", "default", "reduce-overhead")


class DecodeStep:
    """The compiled one-token decode step of :class:`ResponseSampler` (``compile=True`` or a mode), and the static
    KV cache it decodes into.

    - ``"default"``: :func:`models.compile_dynamic` (symbolic batch and cache sizes: one graph for every prompt
      width) and a fresh cache of exactly prompt + response length per call.
    - ``"reduce-overhead"``: ``torch.compile(mode="reduce-overhead")``. On CUDA, Inductor records the step as a CUDA
      graph once per shape and replays it: one launch per step instead of one per kernel (hundreds for a 12-layer
      model), which is what a small-batch decode step waits on. A graph reads its inputs at the addresses it was
      recorded with, so the cache is kept between calls (zeroed in place) and its length is rounded up to a
      multiple of ``bucket``, with the attention mask padded to it (the extra slots lie in the causal future and
      are never attended): prompt widths within a bucket replay the same graph. Each step starts a new graph
      generation (``torch.compiler.cudagraph_mark_step_begin``); the previous step's outputs are not read after it.
      On CPU the mode compiles the same step without graphs.
    - ``"auto"``: ``"reduce-overhead"`` when the inputs are on CUDA, ``"default"`` otherwise, decided at the first
      call (a trainer moves the policy to its device after building the sampler).
    """

    def __init__(self, model: nn.Module, mode: str = "auto", bucket: int = 64) -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"decode step mode {mode!r}: choose from {', '.join(DECODE_MODES)}")
        self.model, self.requested, self.bucket = model, mode, bucket
        self.mode: str | None = None  # resolved at the first call
        self._fn = None
        self._caches: dict[tuple, Any] = {}  # (batch, length, dtype, device) -> the kept StaticCache
        self._mask: tuple[Tensor, Tensor] | None = None  # (mask as given, padded to the cache length)

    def resolve(self, device: torch.device) -> str:
        """The mode for inputs on `device`; builds the compiled function once."""
        if self.mode is None:
            self.mode = (
                self.requested
                if self.requested != "auto"
                else ("reduce-overhead" if device.type == "cuda" else "default")
            )
            forward = models.peft_base(self.model).forward
            if self.mode == "default":
                self._fn = models.compile_dynamic(forward)
            else:  # the settings of models.compile_dynamic; sizes static first, dynamic once a second shape comes
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
                torch._inductor.config.triton.coalesce_tiling_analysis = False
                self._fn = torch.compile(forward, mode="reduce-overhead")
        return self.mode

    @property
    def graphs(self) -> bool:
        return self.mode == "reduce-overhead"

    def cache(self, model: nn.Module, queries: Tensor, total: int, dtype: torch.dtype | None):
        """The static cache for a call with `queries` (B, P) and `total` = P + new tokens (None: not static-able)."""
        if self.resolve(queries.device) == "default":
            return static_cache(model, total, dtype)
        length = -(-total // self.bucket) * self.bucket
        key = (queries.shape[0], length, dtype, queries.device)
        cache = self._caches.get(key)
        if cache is not None:
            cache.reset()  # zeros in place: the addresses the recorded graph reads stay the same
            return cache
        cache = static_cache(model, length, dtype)
        if cache is not None:
            self._caches[key] = cache
        return cache

    def _padded_mask(self, mask: Tensor, length: int) -> Tensor:
        if self._mask is None or self._mask[0] is not mask:  # one mask per call, the same tensor every step
            extra = length - mask.shape[1]
            self._mask = (mask, torch.nn.functional.pad(mask, (0, extra)) if extra > 0 else mask)
        return self._mask[1]

    def __call__(self, **inputs: Any):
        if self.graphs:
            length = inputs["past_key_values"].get_max_length()
            inputs["attention_mask"] = self._padded_mask(inputs["attention_mask"], length)
            if inputs["input_ids"].is_cuda:
                torch.compiler.cudagraph_mark_step_begin()
        return self._fn(**inputs)


class ResponseSampler:
    """Samples up to ``max_new_tokens`` response tokens for a batch of left-padded queries.

    ``compile``: run decode steps as one compiled graph over a static KV cache, with LoRA factors and attention as
    fused reductions (worth it when the sampler is called many times, as in a long PPO run); True picks
    :class:`DecodeStep`'s mode by device (CUDA graphs on a GPU), a mode name (``"default"``, ``"reduce-overhead"``)
    forces it. ``cache_dtype``: the autocast dtype the caller runs under (keys/values are stored in it); None for
    fp32. Call it inside the caller's autocast and no_grad contexts.
    """

    def __init__(
        self,
        model: nn.Module,
        max_new_tokens: int,
        temperature: float,
        eos_token_id: int,
        pad_token_id: int,
        compile: bool | str = False,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        self.model, self.max_new_tokens, self.temperature = model, max_new_tokens, temperature
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.cache_dtype = cache_dtype
        self.compile = compile
        # the base model's forward: with peft the LoRA layers are inside it, and the wrapper adds only dispatch
        # dynamic: prompt widths differ between batches; static sizes would recompile for each new width
        self._step = DecodeStep(model, "auto" if compile is True else compile) if compile else None

    @torch.no_grad()
    def __call__(self, queries: Tensor, query_mask: Tensor) -> tuple[Tensor, int]:
        """(B, P) left-padded queries and mask -> responses (B, max_new_tokens) padded after EOS, decode steps run."""
        batch, prompt_len = queries.shape
        total = prompt_len + self.max_new_tokens
        cache = self._step.cache(self.model, queries, total, self.cache_dtype) if self.compile else None
        step = self._step if cache is not None else self.model
        if cache is None:
            cache = DynamicCache()
        # response positions are always attended (a stopped row's pad tokens are never read back): the mask of the
        # whole final length, sliced for the dynamic cache, whole (static shape) for the compiled step
        mask = torch.cat([query_mask, query_mask.new_ones(batch, self.max_new_tokens)], dim=1)  # (B, P + N)
        positions = models.position_ids_from_mask(query_mask)  # (B, P)
        out = self.model(
            input_ids=queries,
            attention_mask=query_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )  # prefill, eager
        next_position = positions[:, -1:] + 1  # (B, 1)
        responses = torch.full(
            (batch, self.max_new_tokens), self.pad_token_id, dtype=queries.dtype, device=queries.device
        )
        finished = torch.zeros(batch, dtype=torch.bool, device=queries.device)
        if step is self._step:  # compiled: LoRA factors and attention as reductions fused into the graph
            with lora_factors_as_reductions(self.model), models.attention(self.model, DECODE_ATTENTION):
                steps = self._decode(out, step, cache, mask, responses, finished, next_position, prompt_len)
        else:
            steps = self._decode(out, step, cache, mask, responses, finished, next_position, prompt_len)
        return responses, steps

    def _decode(
        self,
        out,
        step,
        cache,
        mask: Tensor,
        responses: Tensor,
        finished: Tensor,
        next_position: Tensor,
        prompt_len: int,
    ) -> int:
        """The sampling loop: fills `responses` in place, returns the number of tokens sampled."""
        steps = 0
        for t in range(self.max_new_tokens):
            tokens = sample_from_logits(out.logits[:, -1], self.temperature)  # (B,)
            tokens = tokens.masked_fill(finished, self.pad_token_id)
            responses[:, t] = tokens
            finished |= tokens == self.eos_token_id
            steps = t + 1
            if steps == self.max_new_tokens or bool(finished.all()):
                break
            length = prompt_len + t + 1  # tokens in the cache after this step's input
            # after the first compiled step of a call, the inputs differ only in values (same shapes, dtypes,
            # cache object, adapter state), so the guards checked then hold: skip re-checking them
            with (
                torch.compiler.set_stance(skip_guard_eval_unsafe=True)
                if step is self._step and t > 0
                else contextlib.nullcontext()
            ):
                out = step(
                    input_ids=tokens[:, None],
                    attention_mask=mask if step is self._step else mask[:, :length],
                    position_ids=next_position + t,
                    past_key_values=cache,
                    use_cache=True,
                    cache_position=torch.tensor([length - 1], device=responses.device),
                )
        return steps
