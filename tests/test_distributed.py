"""vqlab.distributed under 2 gloo processes."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqlab import data, distributed
from vqlab.config import DataConfig, load
from vqlab.trainer import IntervalMeans, fit

from .helpers import spawn_ranks


class UnreadableAt(torch.utils.data.Dataset):
    """Ten samples; sample 1 (which rank 1's shard starts with) cannot be read."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        if index == 1:
            raise data.DataError("cannot read image number 1")
        return torch.zeros(1)


def worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    out = {}
    out["sum"] = distributed.all_reduce_sum(torch.tensor([rank + 1.0])).item()
    out["gather"] = distributed.all_gather_cat(torch.full((rank + 1, 2), float(rank))).tolist()
    out["broadcast"] = distributed.broadcast_object(f"from {rank}")
    module = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(module.weight, 1.0)
    torch.nn.init.zeros_(module.bias)
    distributed.check_in_sync(module, "same")
    out["same_ok"] = True
    with torch.no_grad():
        module.bias[0] = float(rank)  # one element differs on rank 1
    try:
        distributed.check_in_sync(module, "perturbed")
        out["perturbed_detected"] = False
    except RuntimeError as err:
        out["perturbed_detected"] = "out of sync" in str(err)
    means = IntervalMeans()
    for step in range(3):  # rank r logs r + step; "late" appears only from the second step on
        means.add({"loss": torch.tensor(float(rank + step))})
        if step:
            means.add({"late": torch.tensor(10.0 * (rank + 1))})
    out["interval"] = means.read()
    out["interval_after_read"] = means.read()
    try:
        data.check_first_batches(data.val_loader(UnreadableAt(), DataConfig(val_batch_size=2), rank, 2))
        out["data_check"] = None
    except data.DataError as err:
        out["data_check"] = str(err)
    results[rank] = out


def test_collectives_and_desync_detection(tmp_path):
    results = mp.Manager().dict()
    spawn_ranks(worker, (str(tmp_path / "init"), results), 2)
    for rank in range(2):
        out = results[rank]
        assert out["sum"] == 3.0
        assert out["gather"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # rank 0 gave 1 row, rank 1 gave 2
        assert out["broadcast"] == "from 0"
        assert out["same_ok"] and out["perturbed_detected"]
        # the mean over both ranks and all steps of the interval, identical on every rank
        assert out["interval"] == {"loss": (0 + 1 + 2 + 1 + 2 + 3) / 6, "late": (10 + 20) / 2}
        assert out["interval_after_read"] == {}
        assert out["data_check"] == "rank 1: cannot read image number 1"  # raised on both ranks


def threads_outside_python() -> int:
    """This process's threads that Python did not start (gloo's, torch's pools), from /proc."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def fit_rank(rank, init_file, root, results):
    torch.set_num_threads(1)  # no intra-op pool threads to tell from gloo's
    before = threads_outside_python()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    joined = threads_outside_python()
    gan = {"loss.adversarial.weight": 0.1, "loss.adversarial.width": 8, "loss.adversarial.layers": 2}
    gan |= {"loss.adversarial.start_step": 1}  # the discriminator's DDP wrapper too
    fit(load("smoke", {"tracking.root": root, "train.steps": 8, "train.checkpoint_every": 0, **gan}))
    # a Python thread that is ending is in /proc a moment after threading forgot it: count again for a
    # while (a leaked group's threads live until the process exits, so waiting hides nothing)
    deadline = time.monotonic() + 10
    while (after := threads_outside_python()) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    results[rank] = (before, joined, after, dist.is_initialized())


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_a_ddp_fit_ends_its_process_group_and_its_gloo_threads_before_it_returns(tmp_path):
    """A gloo thread alive at interpreter shutdown aborts the process if it then releases a
    collective's tensor; the group (and its threads) must end in ``teardown``, not at exit."""
    results = mp.Manager().dict()
    spawn_ranks(fit_rank, (str(tmp_path / "init"), str(tmp_path / "runs"), results), 2)
    for rank in range(2):
        before, joined, after, still_in_group = results[rank]
        assert joined > before  # the group's threads, seen by this count
        assert not still_in_group
        assert after == before, f"rank {rank}: {after - before} threads outlived the fit"


def test_a_job_of_one_process_joins_no_process_group(monkeypatch):
    """``torchrun --nproc-per-node 1`` sets the variables of a one-process job; a process group
    there only adds DDP's reducer and collectives to every step, so setup joins none."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        ctx = distributed.setup("cpu")
        assert not distributed.initialized()
        assert (ctx.rank, ctx.world_size, ctx.main) == (0, 1, True)
    finally:
        distributed.teardown()
