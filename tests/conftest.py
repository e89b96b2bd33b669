"""Shared fixtures. Tests run offline on CPU with one thread (the machine has two cores and CI shares them)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture()
def outputs(tmp_path):
    """An outputs folder for one test (CommonConfig.outputs_dir)."""
    return str(tmp_path / "outputs")
