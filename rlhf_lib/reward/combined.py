"""An ensemble's members scored together, as one reward: the blocks they share run once, each member's trained
blocks and head on top, each member standardised, then combined by ``mean``, ``min`` or ``uwo``.

The reward-model stage saves an ensemble as its weight average (WARM, :mod:`rlhf_lib.reward.ensemble`) and, beside
it, each member's LoRA factors and head (:data:`MEMBERS_FILE`). Members differ only in their adapted blocks, so
with adapters in the top T of L blocks a combined score costs (L - T + k T) / L block forwards of one member (the
default, T = 2 of 14 and k = 4: 1.43x). :class:`MemberStack` is that forward; every consumer takes it through a
scorer with the shape it already uses:

- :func:`sequence_scorer` (the evaluation, best-of-N, TRL's ``reward_funcs``): token-id sequences -> (N,) rewards;
- :class:`CombinedReward` (PPO's :class:`rlhf_lib.lm.policy_models.RewardFn`): query + response -> (B,) rewards.

``reward = "model"`` everywhere means the saved model itself (a single reward model, or an ensemble's WARM).
Combined rewards are in standard units already (each member z-scored on its scores of the training responses,
samples of the reference policy), so consumers do not normalise them again.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from rlhf_lib.core import runtime
from rlhf_lib.core.io import pad
from rlhf_lib.lm import models
from rlhf_lib.lm.sequences import last_valid_index
from rlhf_lib.reward.ensemble import ADAPTER, COMBINATIONS, lora_layers
from rlhf_lib.reward.scoring import backbone, load_reward_model, score_head
from rlhf_lib.reward.trunk import can_split

MEMBERS_FILE = "ensemble_members.safetensors"  # each member's LoRA factors and head, beside the saved WARM model
ENSEMBLE_FILE = "ensemble.json"  # the stage's ensemble report: standardisation and uwo coefficient read from it
REWARDS = ("model", *COMBINATIONS)  # what a consumer may score with (module docstring)


def check_reward(reward: str, field: str) -> None:
    """One clear line for an unknown ``reward`` setting, naming the field."""
    if reward not in REWARDS:
        raise ValueError(f"{field} = {reward!r} is not a reward; use one of {', '.join(REWARDS)}")


# ----------------------------------------------------------------------------------------------------------------
# saving and reading the members


def adapted_layer_names(model: nn.Module) -> list[str]:
    """Names, under the backbone, of the peft-adapted linear layers, in :func:`lora_layers` order."""
    from peft.tuners.lora import LoraLayer

    return [name for name, m in backbone(model).named_modules() if isinstance(m, LoraLayer)]


def member_factors(model: nn.Module) -> dict[str, Tensor]:
    """A trained member as tensors: each adapted layer's A (r, in), B (out, r) and scale, and the score head."""
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for i, layer in enumerate(lora_layers(model)):
            if getattr(layer, "fan_in_fan_out", False):
                raise ValueError("member factors assume nn.Linear layers (fan_in_fan_out false), as Llama's are")
            out[f"{i}.A"] = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            out[f"{i}.B"] = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
            out[f"{i}.scale"] = torch.tensor(float(layer.scaling[ADAPTER]))
        out["head"] = score_head(model).weight.detach().float().cpu().clone()
    return out


def save_members(folder: Path, members: Sequence[dict[str, Tensor]], layer_names: Sequence[str]) -> Path:
    """Write every member's factors (``member<m>.<layer>.A`` ...) to ``folder``/MEMBERS_FILE, layer names inside."""
    from safetensors.torch import save_file

    tensors = {f"member{m}.{key}": t.contiguous() for m, factors in enumerate(members) for key, t in factors.items()}
    path = Path(folder) / MEMBERS_FILE
    save_file(tensors, str(path), metadata={"layers": json.dumps(list(layer_names)), "members": str(len(members))})
    return path


def read_members(folder: Path) -> tuple[list[dict[str, Tensor]], list[str]]:
    """The members and layer names :func:`save_members` wrote."""
    from safetensors import safe_open

    path = Path(folder) / MEMBERS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} missing: a combined reward needs an ensemble's members; train the reward model with "
            "reward_model.ensemble > 1, or score with reward 'model'"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        k, names = int(meta["members"]), json.loads(meta["layers"])
        members = [
            {key.split(".", 1)[1]: f.get_tensor(key) for key in f.keys() if key.startswith(f"member{m}.")}
            for m in range(k)
        ]
    return members, names


def member_delta(factors: dict[str, Tensor], i: int) -> Tensor:
    """Layer i's merged update Delta W = B A * scale, (out, in), as peft merges it."""
    return factors[f"{i}.B"] @ factors[f"{i}.A"] * factors[f"{i}.scale"]


# ----------------------------------------------------------------------------------------------------------------
# scoring


def block_index(name: str) -> int:
    """The block of a layer named under the backbone (``layers.<i>.…``); -1 for anything outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() else -1


def combine_tensor(z: Tensor, how: str, uwo_coef: float) -> Tensor:
    """:func:`rlhf_lib.reward.ensemble.combine` on a (k, B) tensor -> (B,)."""
    if how == "mean":
        return z.mean(dim=0)
    if how == "min":
        return z.min(dim=0).values
    if how == "uwo":
        return z.mean(dim=0) - uwo_coef * z.var(dim=0, unbiased=False)
    raise ValueError(f"unknown ensemble combination {how!r}; use one of {COMBINATIONS}")


class MemberStack(nn.Module):
    """k members on the saved WARM model: its blocks below the lowest adapted one shared, then per member its own
    copy of the blocks above (base weights + its merged update), the final norm and its head.

    ``member_scores`` gives (k, B) raw rewards; ``forward`` the (B,) combination of their standardised values.
    """

    def __init__(
        self,
        warm: nn.Module,
        members: Sequence[dict[str, Tensor]],
        layer_names: Sequence[str],
        stats: Sequence[dict[str, float]],
        how: str,
        uwo_coef: float,
    ) -> None:
        super().__init__()
        if how not in COMBINATIONS:
            raise ValueError(f"unknown ensemble combination {how!r}; use one of {COMBINATIONS}")
        if not can_split(warm):
            raise ValueError(
                f"combined ensemble rewards split a Llama-family backbone; {type(warm).__name__} is not one: "
                "score with reward 'model' (the members' weight average)"
            )
        if len(stats) != len(members):
            raise ValueError(f"{len(members)} members but {len(stats)} standardisation entries in {ENSEMBLE_FILE}")
        blocks = [block_index(n) for n in layer_names]
        if min(blocks, default=0) < 0:
            raise ValueError("a member adapts a layer outside the transformer blocks; score with reward 'model'")
        self.how, self.uwo_coef = how, float(uwo_coef)
        self.model = warm  # shared embeddings, lower blocks, final norm
        body = backbone(warm)
        self.first_block = min(blocks, default=len(body.layers))
        top = body.layers[self.first_block :]
        deltas = [[member_delta(f, i) for i in range(len(layer_names))] for f in members]
        mean_delta = [torch.stack(d).mean(dim=0) for d in zip(*deltas)] if deltas and layer_names else []
        self.tops = nn.ModuleList()
        self.heads = nn.ModuleList()
        with torch.no_grad():
            for factors, member in zip(members, deltas):
                own = copy.deepcopy(top)
                for name, delta, avg in zip(layer_names, member, mean_delta):
                    linear = own[block_index(name) - self.first_block].get_submodule(name.split(".", 2)[2])
                    base = linear.weight.float() - avg  # WARM = base + mean update, so base = WARM - mean update
                    linear.weight.copy_((base + delta).to(linear.weight.dtype))
                head = copy.deepcopy(score_head(warm))
                head.weight.copy_(factors["head"].to(head.weight.dtype))
                self.tops.append(own)
                self.heads.append(head)
        self.register_buffer("mean", torch.tensor([s["mean"] for s in stats], dtype=torch.float32))  # (k,)
        self.register_buffer("std", torch.tensor([s["std"] for s in stats], dtype=torch.float32))  # (k,)
        self.requires_grad_(False).eval()

    @property
    def config(self) -> Any:
        """The shared model's config (what the PPO trainer's model preparation reads, e.g. dropout settings)."""
        return self.model.config

    @property
    def k(self) -> int:
        return len(self.heads)

    def _run(self, blocks: Sequence[nn.Module], hidden: Tensor, mask: Any, rotary: Any, positions: Tensor) -> Tensor:
        for block in blocks:
            hidden = block(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        return hidden

    @torch.no_grad()
    def member_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) sequences (any padding side) -> (k, B) float32 rewards, each read at its last real token."""
        from transformers.masking_utils import create_causal_mask

        body = backbone(self.model)
        device = next(self.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        last = last_valid_index(attention_mask)  # (B,)
        if (last < 0).any():
            raise ValueError("a row with no real token (attention_mask all 0) has no reward")
        positions = models.position_ids_from_mask(attention_mask)  # (B, T)
        hidden = body.embed_tokens(input_ids)  # (B, T, H)
        mask = create_causal_mask(
            config=body.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=positions,
        )
        rotary = body.rotary_emb(hidden, position_ids=positions)
        shared = self._run(body.layers[: self.first_block], hidden, mask, rotary, positions)  # (B, T, H)
        rows = torch.arange(input_ids.shape[0], device=device)
        scores = []
        for top, head in zip(self.tops, self.heads):
            pooled = body.norm(self._run(top, shared, mask, rotary, positions)[rows, last])  # (B, H)
            with torch.autocast(device_type=device.type, enabled=False):  # head in fp32, as score_sequences
                scores.append(nn.functional.linear(pooled.float(), head.weight.float()).squeeze(-1))  # (B,)
        return torch.stack(scores).float()  # (k, B)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) combined reward: each member standardised, then mean / min / mean - uwo_coef * variance."""
        z = (self.member_scores(input_ids, attention_mask) - self.mean[:, None]) / self.std.clamp(min=1e-8)[:, None]
        return combine_tensor(z, self.how, self.uwo_coef)  # (B,)


def load_member_stack(folder: str | Path, how: str, device: torch.device | str = "cpu", policy_tokenizer=None):
    """(MemberStack, tokenizer) for a saved ensemble reward model folder, combined by ``how``."""
    folder = Path(folder)
    warm, tokenizer, _ = load_reward_model(folder, device="cpu", require_stats=False, policy_tokenizer=policy_tokenizer)
    members, names = read_members(folder)
    report_path = folder / ENSEMBLE_FILE
    if not report_path.exists():
        raise FileNotFoundError(f"{report_path} missing: the reward-model stage writes it with the members")
    report = json.loads(report_path.read_text())
    if "standardisation" not in report:
        raise ValueError(f"{report_path} has no 'standardisation' entry: re-run the reward_model stage")
    stack = MemberStack(warm, members, names, report["standardisation"], how, report.get("uwo_coef", 0.5))
    return stack.to(device), tokenizer


def sequence_scorer(
    folder: str | Path,
    how: str,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    policy_tokenizer=None,
):
    """A scorer of token-id sequences (list of lists) -> (N,) float64 combined rewards, right-padded batches."""
    stack, tokenizer = load_member_stack(folder, how, device, policy_tokenizer)
    pad_id = tokenizer.pad_token_id

    def score(sequences: list[list[int]]) -> np.ndarray:
        out: list[np.ndarray] = []
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad(sequences[start : start + batch_size], pad_id, side="right")  # (B, L)
            with runtime.autocast(device, dtype):
                out.append(stack(ids, mask).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    return score


class CombinedReward:
    """PPO's RewardFn on a :class:`MemberStack`: the combined reward of query + response (already standardised)."""

    def __init__(self, stack: MemberStack) -> None:
        self.head = stack  # the trainer moves and prepares a reward function's ``head`` like its other models

    def __call__(self, query_responses: Tensor, attention_mask: Tensor, context_length: int) -> Tensor:
        return self.head(query_responses, attention_mask)  # (B,)
