"""``train.dtype`` as an autocast context: the one place training and evaluation share it."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
