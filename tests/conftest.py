from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(autouse=True)
def nothing_written_to_the_working_folder():
    """A test that lets MLflow (or anything) default to ./mlruns or ./runs writes into the checkout."""
    strays = [Path("mlruns"), Path("runs") / "mlflow.db"]
    before = {p for p in strays if p.exists()}
    yield
    written = {p for p in strays if p.exists()} - before
    assert not written, f"the test wrote {sorted(map(str, written))} into the working folder"
