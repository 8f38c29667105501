from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import vqlab

# `make test` runs two pytest-xdist workers on the 2 cores CI has: a thread each keeps them from
# contending; run alone (`pytest tests/...`), a test has both. The processes a worker starts (a
# notebook's kernel, a command, torchrun's ranks) get one thread too: with two threads each beside
# the other worker, OpenMP's waiting threads took the cores (the integer-codes notebook test: 66 s
# with two, 29 s with one, on the same busy machine).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items):
    """Tests marked ``longest`` first: xdist hands tests out in collection order, and the README's
    minutes-long command test collected late would leave one worker running it alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)


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


@pytest.fixture(autouse=True)
def no_mlflow_store_from_outside():
    """Every test starts without $MLFLOW_TRACKING_URI and with MLflow's global URI unset: one set by
    the shell, or left by an earlier test in the same worker (``mlflow.set_tracking_uri`` sets the
    variable), would send every later run to that store, where runs of other tests with the same
    experiment names are found (a sweep test found another test's unseeded run). Not through
    ``monkeypatch``: requested here, its teardown (a test's ``chdir`` undone) would come after
    ``nothing_written_to_the_working_folder``'s check."""
    import mlflow

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)  # also unsets the variable
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved
