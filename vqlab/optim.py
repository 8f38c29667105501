"""Optimizer and learning-rate schedule from ``OptimConfig``."""

from __future__ import annotations

import math

import torch
from torch import nn

from vqlab.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s trainable parameters (the generator's, and the discriminator's
    with its own ``OptimConfig``). Fused kernels, on CPU and CUDA: one kernel for every
    parameter's update, and a ``found_inf`` flag that skips a step on the device
    (``skip_step_if``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda")
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.betas[0], weight_decay=cfg.weight_decay, fused=fused)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup from 0, then constant, linear or cosine
    decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
    shape = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def skip_step_if(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
    """Make the next ``optimizer.step()`` leave the parameters and the optimizer's state (moments,
    step counts) exactly as they are where the 0-dim boolean ``flag`` is true, decided on the
    device: no host-device sync. It is the ``found_inf`` flag that ``torch.amp.GradScaler`` hands
    the fused optimizers, which every optimizer of ``build_optimizer`` is."""
    if not optimizer.defaults.get("fused"):
        raise ValueError(f"skip_step_if needs a fused optimizer; {type(optimizer).__name__} is not")
    optimizer.found_inf = flag.float()
