"""Trivial reference codecs, measured like the model: block-mean colours, exact or from a palette."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from vqlab.evaluators.reconstruction import ReconstructionMetrics


def block_mean(images: torch.Tensor, block: int = 8, levels: int = 0) -> torch.Tensor:
    """A trivial reference "reconstruction": every ``block x block`` patch replaced by its mean
    colour; with ``levels``, each channel of that colour rounded to ``levels`` values in [-1, 1]
    (a palette of ``levels**3`` colours, i.e. a code of that many entries per block)."""
    pooled = torch.nn.functional.avg_pool2d(images, block)
    if levels:
        pooled = torch.round((pooled + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
    return torch.nn.functional.interpolate(pooled, scale_factor=block, mode="nearest")


def palette_levels(codebook_size: int) -> int:
    """Per-channel levels of the largest RGB palette with at most ``codebook_size`` colours."""
    levels = max(round(codebook_size ** (1 / 3)), 2)
    while levels > 2 and levels**3 > codebook_size:
        levels -= 1
    return levels


@torch.no_grad()
def block_mean_baseline(loader: DataLoader, device: torch.device, block: int, codebook_size: int) -> dict[str, float]:
    """Pixel metrics of two trivial codecs measured like the model: each ``block x block`` patch
    replaced by its mean colour (``baseline/``), and by that colour from an RGB palette of at most
    ``codebook_size`` colours, one code per block like the tokenizer's (``baseline_palette/``)."""
    levels = palette_levels(codebook_size)
    exact, palette = ReconstructionMetrics(device), ReconstructionMetrics(device)
    for images in loader:
        images = images.to(device)
        exact.update_pairs(images, block_mean(images, block))
        palette.update_pairs(images, block_mean(images, block, levels))
    metrics = {f"baseline/{k}": v for k, v in exact.compute().items()}
    metrics |= {f"baseline_palette/{k}": v for k, v in palette.compute().items()}
    return metrics | {"baseline_palette/colors": float(levels**3)}
