import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vqlab import checkpoint, distributed
from vqlab.models import AutoencoderOutput
from vqlab.quantizers import QuantizerOutput

# Python-level reads of a tensor's value: on a GPU each waits for the device (a host-device sync).
HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric_at(run_dir: Path, key: str, step: int) -> float:
    return next(row[key] for row in read_metrics(run_dir) if row["step"] == step and key in row)


def final_state(run_dir):
    return checkpoint.latest_valid(run_dir / "checkpoints")[1]


def assert_states_equal(a, b):
    for key in ("model", "optimizer", "schedule"):
        flat_a, flat_b = flatten_state(a[key]), flatten_state(b[key])
        assert flat_a.keys() == flat_b.keys()
        for name in flat_a:
            va, vb = flat_a[name], flat_b[name]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, f"{key}.{name}"


def flatten_state(obj, prefix=""):
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flatten_state(value, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in flatten_state(value, f"{prefix}{i}.").items()}
    return {prefix: obj}


def model_output(
    reconstruction: torch.Tensor | None = None, codes: torch.Tensor | None = None, latents: torch.Tensor | None = None
) -> AutoencoderOutput:
    """A model output holding only what the evaluator under test reads."""
    return AutoencoderOutput(reconstruction, QuantizerOutput(z_q=latents, codes=codes), latents)


def tracked_smoke_runs(root: Path, variants: dict[str, dict]) -> str:
    """4 steps of the smoke preset per variant (run name -> overrides), one thread, in the MLflow
    experiment ``E`` of a store under ``root``; returns the store's URI."""
    import vqlab

    uri = f"sqlite:///{root}/mlflow.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, overrides in variants.items():
        base = {"tracking.root": str(root), "tracking.mlflow": True, "tracking.mlflow_uri": uri}
        base |= {"tracking.experiment": "E", "tracking.run_name": name, "train.steps": 4, "optim.warmup_steps": 0}
        vqlab.fit(vqlab.config.load("smoke", base | overrides))
    torch.set_num_threads(threads)
    return uri


def spawn_ranks(worker, args: tuple, nprocs: int) -> None:
    """``mp.spawn(worker, args, nprocs)``, each rank leaving the process group
    (``vqlab.distributed.teardown``) once ``worker(rank, *args)`` returns; a rank that dies of a
    signal prints every thread's C++ frames first."""
    mp.spawn(_rank, args=(worker, args), nprocs=nprocs)


def _rank(rank: int, worker, args: tuple) -> None:
    torch._C._set_print_stack_traces_on_fatal_signal(True)
    worker(rank, *args)
    distributed.teardown()


def free_port() -> int:
    """A port free on 127.0.0.1 now; no loopback to listen on is this machine's limit, not vqlab's."""
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]
    except OSError as err:
        pytest.skip(f"cannot listen on 127.0.0.1: {err}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status == 200
    except OSError:  # not listening yet (URLError is an OSError)
        return False


@contextlib.contextmanager
def mlflow_server(store_uri: str, artifacts: Path, log: Path):
    """``mlflow server`` on ``store_uri`` (artifacts served from ``artifacts``, output in ``log``), as
    a user starts it; yields its base URL once it answers, and stops it with its children."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store_uri]
    command += ["--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1"]
    base = f"http://127.0.0.1:{port}"
    # without MLflow's job runner (a dozen worker processes for its GenAI jobs, 15 s of CPU to start):
    # no test runs a job
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as output:  # its own process group: the command starts uvicorn
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 300  # a busy machine imports MLflow's server slowly
        while not answers(f"{base}/health"):
            assert server.poll() is None, f"mlflow server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"mlflow server did not answer in 300 s:\n{log.read_text()}"
            time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
