"""The validation loop: a model over a whole (sharded) validation set through an evaluator suite."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from vqlab.evaluators.base import Evaluator
from vqlab.models import VQAutoencoder
from vqlab.runtime import autocast


@torch.no_grad()
def evaluate(
    model: VQAutoencoder,
    loader: DataLoader,
    metrics: Evaluator,
    device: torch.device,
    dtype: str,
    prefix: str,
) -> dict[str, float]:
    """Run ``metrics`` (an ``evaluators.Suite``) over the whole validation set (all ranks'
    shards) from a fresh state; keys ``<prefix>/<metric>``. Training-time validation and
    ``python -m vqlab.evaluate`` both call this, so their numbers mean the same."""
    was_training = model.training
    model.eval()
    metrics.reset()
    for images in loader:
        images = images.to(device)
        with autocast(device, dtype):
            out = model(images)
        metrics.update(images, out)
    model.train(was_training)
    return {f"{prefix}/{k}": v for k, v in metrics.compute().items()}
