"""The validation loop: a model over a whole (sharded) validation set through an evaluator suite."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vqlab.evaluators.base import Evaluator
from vqlab.models import VQAutoencoder
from vqlab.runtime import autocast


@torch.no_grad()
def measure(
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


def measure_with_ema(
    model: VQAutoencoder,
    ema: VQAutoencoder | None,
    loader: DataLoader,
    metrics: Evaluator,
    device: torch.device,
    dtype: str,
    prefix: str,
    save_to: Path | None = None,
    file_prefix: str = "",
) -> tuple[dict[str, float], list[Path]]:
    """``model`` as ``<prefix>/*``, then its weight EMA (when there is one) as ``<prefix>_ema/*``;
    with ``save_to``, each one's artifacts (the code histograms) are written there after its pass,
    the EMA's with ``ema_`` after ``file_prefix``. Training's final validation and ``python -m
    vqlab.evaluate`` both call this. Returns the metrics and the files written."""
    results, files = {}, []
    for name, measured, stem in ((prefix, model, file_prefix), (f"{prefix}_ema", ema, f"{file_prefix}ema_")):
        if measured is None:
            continue
        results |= measure(measured, loader, metrics, device, dtype, name)
        if save_to is not None:
            files += metrics.save(save_to, prefix=stem)
    return results, files
