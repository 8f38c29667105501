from __future__ import annotations

import pytest
import torch

import vqlab

torch.set_num_threads(2)


@pytest.fixture
def smoke_cfg(tmp_path):
    """The smoke preset writing under a temporary runs root."""

    def make(**overrides):
        return vqlab.config.load("smoke", {"tracking.root": str(tmp_path / "runs"), **overrides})

    return make
