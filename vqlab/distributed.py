"""The few collectives vqlab needs, each a no-op in a single process.

Every rank must call them in the same order; callers never branch on the rank around them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vqlab.errors import UserError

if dist.is_available():
    # Imported before any process group exists, on purpose. torch.distributed.nn.functional's
    # functions take ``group=group.WORLD`` as a default argument, read once, when it is first imported; DDP
    # imports it, so a job that imported it after ``init_process_group`` kept the group in those
    # defaults past ``destroy_process_group``. The group's gloo threads then lived into interpreter
    # shutdown, where one that released a finished collective's tensor (which takes the GIL)
    # aborted the process: SIGABRT, "terminate called without an active exception", after the job
    # had finished. Read now, the defaults are None and ``teardown`` ends the group's threads.
    import torch.distributed.nn.functional


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (on the caller's real buffer, not a copy)."""
    if initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks as a new tensor; ``tensor`` is left as it was."""
    return all_reduce_sum_(tensor.clone()) if initialized() else tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s values, in place."""
    if initialized():
        dist.broadcast(tensor, src)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (rank order); sizes along dim 0 may differ."""
    if not initialized():
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)])


class DeviceError(UserError, RuntimeError):
    """The requested device is not available on this machine."""


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Context:
    """Join the process group when launched by torchrun with more than one process: NCCL on CUDA,
    gloo on CPU. ``device`` is ``auto``, ``cpu`` or ``cuda``; each rank takes the GPU of its
    ``LOCAL_RANK``. A job of one process (``torchrun --nproc-per-node 1`` on one node) joins none,
    so it runs exactly as a plain process: no DDP reducer, no collectives."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device=cuda but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    return Context(rank=rank(), world_size=world_size(), device=target)


def teardown() -> None:
    """Leave the process group together: a rank that exits while a peer still talks to it can
    abort the peer's gloo threads."""
    if initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 (what reads or writes the run folder), its result on every rank; an
    exception raised there is raised on every rank, so none waits for a peer that gave up."""
    value, error = None, None
    if rank() == 0:
        try:
            value = fn()
        except Exception as err:
            error = err
    shared = broadcast_object((value, portable(error)))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise shared[1]
    return shared[0]


def portable(error: Exception | None) -> Exception | None:
    """``error`` if it survives pickling (it crosses to the other ranks), else a RuntimeError with its text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def state_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_in_sync(module: torch.nn.Module, what: str) -> None:
    """Raise on every rank if any rank's parameters or buffers differ from the others' by a bit."""
    digests = all_gather_objects(state_digest(module))
    if len(set(digests)) > 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
        raise RuntimeError(f"ranks out of sync at {what}: identical groups of ranks {sorted(groups.values())}")
