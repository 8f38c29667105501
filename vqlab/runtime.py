"""What models, quantizers and the trainer share about how they run: seeding, the RNG state a
checkpoint carries, mixed precision (bf16 autocast, and the fp32 island inside it), and the model
EMA (docs/architecture.md).
"""

from __future__ import annotations

import copy
import os
import platform
import random
import subprocess
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global torch generators this process draws from (CPU, and the device's on CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def autocast(device: torch.device, dtype: str):
    """bf16 autocast for ``train.dtype=bf16``; fp32 runs as it is."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class fp32_island(torch.autocast):
    """Autocast off for quantization math (distances, rounding, argmin) and other numerically
    delicate islands such as attention logits: they stay in fp32 inside a bf16 model."""

    def __init__(self, device: torch.device):
        super().__init__(device_type=device.type, enabled=False)


class ModelEMA:
    """Exponential moving average of every floating parameter and buffer (EMA codebooks
    included); integer buffers are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for average, current in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(current, 1.0 - self.decay)
            else:
                average.copy_(current)


def runtime_record(device: torch.device, world_size: int) -> dict[str, str]:
    """What a run's numbers depend on beyond its config: the thread count changes the order of
    float sums (1 against 2 threads moves a smoke run's L1 in the 4th digit), and so do the torch
    version, the device and the CPU (its vector instructions pick torch's kernels: the same
    config, seed and thread count ended 0.0698 and 0.0683 val L1 on two machines). Recorded with
    every run so a rerun can match it."""
    return {
        "threads": str(torch.get_num_threads()),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "world_size": str(world_size),
        "commit": git_commit(),
    }


def cpu_name() -> str:
    """The CPU's model and the vector instructions torch's kernels use on it, e.g. ``AMD EPYC
    (AVX512)``, and oneDNN's cap where ``ONEDNN_MAX_CPU_ISA`` sets one (its convolutions round
    differently with AVX-512 kernels: ``AMD EPYC (AVX512, oneDNN AVX2)`` makes an AVX2 machine's
    numbers)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}{f', oneDNN {cap}' if cap else ''})"


def git_commit() -> str:
    """The commit of the vqlab checkout that runs (``unknown`` outside a git checkout)."""
    folder = Path(__file__).resolve().parent
    found = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else "unknown"
