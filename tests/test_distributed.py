"""vqlab.distributed under 2 gloo processes."""

import atexit
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqlab import data, distributed
from vqlab.config import DataConfig
from vqlab.trainer import IntervalMeans

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
    spawn_ranks(worker, (str(tmp_path / "init"), results), 2, tmp_path)
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


def abort_on_exit(rank, init_file):
    # in a process group, so that the teardown's barrier holds each rank until both finished their work
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    atexit.register(os.abort)  # after the work and the teardown: as gloo's teardown aborts


def abort_in_the_work(rank):
    if rank == 1:
        os.abort()


def test_a_rank_that_aborts_after_the_work_warns_and_one_that_aborts_in_it_fails(tmp_path):
    (tmp_path / "after").mkdir()
    (tmp_path / "during").mkdir()
    with pytest.warns(UserWarning, match="died of SIGABRT leaving the process group"):
        spawn_ranks(abort_on_exit, (str(tmp_path / "init"),), 2, tmp_path / "after")
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        spawn_ranks(abort_in_the_work, (), 2, tmp_path / "during")
