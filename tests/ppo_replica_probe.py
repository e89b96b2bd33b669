"""``python -m rlhf_lib.pipeline`` with its arguments, plus a record per process for tests/test_run_safety.py.

Only the main process writes the policy, so the files of a multi-process PPO run cannot show whether every process
trained the same replica. Run under ``accelerate launch``, each process here also writes
``$PPO_REPLICA_DIR/rank_<i>.json``: the sha256 of its trainable weights (policy adapter and value model) before
training and when it ends, and of the prompts of each of its updates. With gradients all-reduced the replicas stay
bit-identical while the prompts differ; without, each process steps on its own prompts' gradient and they part.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from rlhf_lib import pipeline
from rlhf_lib.ppo import checkpoints, trainer


def tensor_sha256(named: dict) -> str:
    """sha256 over the names and raw bytes of a name -> tensor mapping, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named.items()):
        digest.update(name.encode() + b"\0")
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())  # bytes, any dtype
    return digest.hexdigest()


def replica_sha256(ppo: trainer.PPOTrainer) -> dict[str, str]:
    unwrap = ppo.accelerator.unwrap_model
    return {
        "policy": tensor_sha256(checkpoints.trainable_state(unwrap(ppo.policy))),
        "value": tensor_sha256(checkpoints.trainable_state(unwrap(ppo.value))),
    }


RECORDS: dict[int, dict] = {}  # id(trainer) -> its record


def _record(ppo: trainer.PPOTrainer) -> dict:
    return RECORDS.setdefault(id(ppo), {"rank": ppo.accelerator.process_index, "queries": []})


def _write(ppo: trainer.PPOTrainer) -> None:
    record = _record(ppo)
    record.update(world_size=ppo.accelerator.num_processes, updates=ppo.update, end=replica_sha256(ppo))
    path = Path(os.environ["PPO_REPLICA_DIR"]) / f"rank_{record['rank']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def install() -> None:
    """Wrap PPOTrainer.train (weights before it), _sample_rollout (each update's prompts) and save_policy (weights
    at the end, then the record is written; every process calls it)."""
    train, sample, save = trainer.PPOTrainer.train, trainer.PPOTrainer._sample_rollout, trainer.PPOTrainer.save_policy

    def recorded_train(self):
        _record(self)["start"] = replica_sha256(self)
        return train(self)

    def recorded_sample(self):
        roll = sample(self)
        _record(self)["queries"].append(tensor_sha256({"queries": roll.queries}))
        return roll

    def recorded_save(self, out_dir):
        _write(self)
        return save(self, out_dir)

    trainer.PPOTrainer.train = recorded_train
    trainer.PPOTrainer._sample_rollout = recorded_sample
    trainer.PPOTrainer.save_policy = recorded_save


if __name__ == "__main__":
    install()
    sys.exit(pipeline.main(sys.argv[1:]))
