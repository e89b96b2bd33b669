"""PPO checkpoints: write, resume, list, and load a checkpoint's policy -- for training and evaluation alike.

A run's ``checkpoints/`` holds one folder per saved update, ``update_XXXX``::

    policy.safetensors   trainable policy parameters (LoRA adapters, or all weights for full fine-tuning)
    meta.json            update, episode, base model, LoRA settings, frozen-weight dtype, the stage config
    value.safetensors, optimizer.pt, trainer_state.pt, rng_<process>.pt   full training state, newest folder only

Folders are written under a ``.tmp`` name and renamed into place, so a killed run never leaves a half-written
checkpoint; older checkpoints keep only the policy weights and meta.json (for the over-optimisation curve).

Nothing read from a checkpoint can run code: weights are safetensors, and the ``.pt`` files are loaded with
``torch.load(weights_only=True)``, which unpickles only tensors and plain containers and refuses anything else
(:class:`UnsafeCheckpointError`). The RNG states are stored as tensors and ints for that reason.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rlhf_lib.lm import models
from rlhf_lib.lm.policy_models import lora_config, round_frozen_linears

PREFIX = "update_"
POLICY_FILE, META_FILE, STATE_FILE = "policy.safetensors", "meta.json", "trainer_state.pt"
LORA_DEFAULTS = {"lora_target_modules": [], "trainable_top_layers": 0}  # for meta.json written before these keys


def checkpoint_update(folder: str | Path) -> int | None:
    """The update number of a checkpoint folder name (update_0012 -> 12), else None."""
    name = Path(folder).name
    digits = name[len(PREFIX) :]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Checkpoint folders (``update_XXXX``) by update number, oldest first; none for a missing folder."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_update(p) is not None]
    return sorted(found, key=checkpoint_update)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest checkpoint folder holding full training state (None when there is none)."""
    full = [f for f in list_checkpoints(checkpoints_dir) if (f / STATE_FILE).exists()]
    return full[-1] if full else None


# ----------------------------------------------------------------------------------------------------------------
# parameters and RNG state


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by name (all weights for full fine-tuning; adapters + value head for LoRA)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load `trainable_state` output back, refusing partial matches."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = names - set(state), set(state) - names
    if missing or unexpected:
        raise ValueError(
            f"{what}: checkpoint does not match the model (missing {sorted(missing)[:3]}..., "
            f"unexpected {sorted(unexpected)[:3]}...); was it written with other model/LoRA settings?"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].dtype))


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled Python objects other than tensors and plain data (which could run code)."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors, ints and floats only (loadable with weights_only)."""
    version, mt, gauss = random.getstate()  # (3, 625 ints < 2**32, None or float)
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # ('MT19937', uint32[624], int, int, float)
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["kind"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state_file(path: Path, map_location: Any = None) -> Any:
    """``torch.load`` of a checkpoint ``.pt`` file with ``weights_only=True``: tensors and plain data, no code.

    Anything else (a crafted pickle, or a file written by an old version with NumPy arrays inside) is refused with
    UnsafeCheckpointError naming the file and the fix.
    """
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} holds Python objects other than tensors and plain data, which could run code when loaded, so "
            f"it was not loaded; resume only from checkpoints this library wrote (or delete {path.parent} and "
            "start the stage over)"
        ) from err


# ----------------------------------------------------------------------------------------------------------------
# writing and resuming (every process calls these; the main process writes the shared files)


def save_checkpoint(
    accelerator,
    checkpoints_dir: Path,
    update: int,
    policy: nn.Module,
    value: nn.Module,
    optimizer,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write ``update_XXXX`` atomically (unwrapped `policy` / `value`); older checkpoints keep only their policy."""
    from safetensors.torch import save_file

    main = accelerator.is_main_process
    final = Path(checkpoints_dir) / f"{PREFIX}{update:04d}"
    tmp = final.with_name(final.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if main:
        save_file(trainable_state(policy), str(tmp / POLICY_FILE))
        save_file(trainable_state(value), str(tmp / "value.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")  # every process: its own sampling RNG
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(checkpoints_dir):
            if old != final:
                for extra in old.iterdir():  # keep policy weights for the over-optimisation curve
                    if extra.name not in (POLICY_FILE, META_FILE):
                        extra.unlink()
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: Path, policy: nn.Module, value: nn.Module, optimizer) -> dict[str, Any]:
    """Restore weights, optimiser and this process's RNG from `folder`; returns the saved trainer state."""
    from safetensors.torch import load_file

    # every pickle is checked before any of it is applied, so a refused file leaves the models as they were
    optimizer_state = load_state_file(folder / "optimizer.pt", map_location=accelerator.device)
    rng = load_state_file(folder / f"rng_{accelerator.process_index}.pt")
    trainer_state = load_state_file(folder / STATE_FILE)
    load_trainable_state(policy, load_file(str(folder / POLICY_FILE)), f"{folder}/{POLICY_FILE}")
    load_trainable_state(value, load_file(str(folder / "value.safetensors")), f"{folder}/value.safetensors")
    optimizer.load_state_dict(optimizer_state)
    set_rng_state(rng)
    return trainer_state


def export_policy(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """`model` (a trained policy, possibly peft) in Hugging Face format, LoRA merged, fp32, with its tokenizer;
    written atomically. Loads with ``transformers.pipeline("text-generation", model=out_dir)``."""
    out_dir = Path(out_dir)
    model = model.float()  # frozen weights were stored in bf16: merge LoRA in fp32
    if models.is_peft(model):
        model = model.merge_and_unload()
    if getattr(model.config, "tie_word_embeddings", False):  # undo the bf16 copy of a frozen tied head
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# evaluation: a checkpoint's policy as a plain model


def load_policy_checkpoint(path: str | Path, cfg: Any, tokenizer=None) -> nn.Module:
    """The policy of a checkpoint folder (``checkpoints/update_XXXX``) as a plain fp32 causal LM (LoRA merged).

    Any stage config works (only ``cfg.model`` is read, for the tokenizer); the base model and LoRA settings come
    from the checkpoint's meta.json.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / POLICY_FILE).exists():
        raise FileNotFoundError(f"{path} holds no {POLICY_FILE}; checkpoints live in <run>/checkpoints/update_XXXX")
    meta = json.loads((path / META_FILE).read_text())
    tokenizer = tokenizer or models.load_tokenizer(cfg.model)
    model = models.load_causal_lm(meta["model"], tokenizer)
    if meta["lora"] is not None:
        from peft import get_peft_model

        model = get_peft_model(
            model, lora_config(SimpleNamespace(**{**LORA_DEFAULTS, **meta["lora"]}), "CAUSAL_LM", model)
        )
        if meta.get("frozen_dtype") == "bfloat16":
            round_frozen_linears(model, torch.bfloat16)
    load_trainable_state(model, load_file(str(path / POLICY_FILE)), f"{path}/{POLICY_FILE}")
    if meta["lora"] is not None:
        model = model.merge_and_unload()
    return model.eval()
