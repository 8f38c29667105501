"""Trivial reference codecs, measured like the model: block-mean colours, exact or from a palette
(a uniform RGB cube, or one fitted by k-means on training crops)."""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vqlab.cluster import kmeans, nearest
from vqlab.evaluators.reconstruction import ReconstructionMetrics

# Above this many colours the k-means palette is capped (its row says how many it has): greedy
# k-means++ seeding takes one step per colour, 0.8 s for 1024 colours on one CPU core but 13 s for
# 4096, which every run above 2^10 codes (and every continuous run) would pay before training.
KMEANS_MAX_COLOURS = 1024
BLOCKS_PER_COLOUR = 8  # training blocks the k-means palette is fitted on, per colour
KMEANS_ITERS = 10


def block_mean(images: torch.Tensor, block: int = 8, levels: int = 0) -> torch.Tensor:
    """A trivial reference "reconstruction": every ``block x block`` patch replaced by its mean
    colour; with ``levels``, each channel of that colour rounded to ``levels`` values in [-1, 1]
    (a palette of ``levels**3`` colours, i.e. a code of that many entries per block)."""
    pooled = torch.nn.functional.avg_pool2d(images, block)
    if levels:
        pooled = torch.round((pooled + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
    return torch.nn.functional.interpolate(pooled, scale_factor=block, mode="nearest")


def block_colours(images: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B * H/block * W/block, C)``: the mean colour of every block."""
    pooled = torch.nn.functional.avg_pool2d(images, block)
    return pooled.permute(0, 2, 3, 1).reshape(-1, images.shape[1])


def block_mean_from_palette(images: torch.Tensor, block: int, palette: torch.Tensor) -> torch.Tensor:
    """``block_mean`` with each block's mean colour replaced by the nearest of ``palette`` ``(K, C)``."""
    b, c, h, w = images.shape
    snapped = palette[nearest(block_colours(images, block), palette)]
    pooled = snapped.reshape(b, h // block, w // block, c).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(pooled, scale_factor=block, mode="nearest")


# A continuous model's budget: one palette colour per block at 8 bits a channel, every RGB colour.
CONTINUOUS_BUDGET = 2**24


def code_budget(quantizer) -> int:
    """The codes a trivial codec gets per token-sized block: the quantizer's codebook, or for a
    continuous one every RGB colour (``CONTINUOUS_BUDGET``)."""
    return quantizer.codebook_size if quantizer.discrete else CONTINUOUS_BUDGET


def palette_levels(codebook_size: int) -> int:
    """Per-channel levels of the largest RGB palette with at most ``codebook_size`` colours."""
    levels = max(round(codebook_size ** (1 / 3)), 2)
    while levels > 2 and levels**3 > codebook_size:
        levels -= 1
    return levels


def kmeans_palette(train: Dataset, block: int, codebook_size: int, seed: int) -> torch.Tensor:
    """``(K, C)`` palette on the CPU: k-means (``vqlab.cluster.kmeans``, seeded with ``seed``) on the
    block-mean colours of training crops, ``K = min(codebook_size, KMEANS_MAX_COLOURS)``, or the
    number of distinct colours when there are fewer. The crops are ``train[i]`` for indices spread
    evenly over the dataset, enough for ``BLOCKS_PER_COLOUR`` blocks per colour where it has them:
    read by index, never from a loader, so the training stream and every global RNG stay untouched.
    Fitted on the CPU so that every device and every rank gets the same palette, bit for bit."""
    k = min(codebook_size, KMEANS_MAX_COLOURS)
    first = train[0]
    per_crop = (first.shape[1] // block) * (first.shape[2] // block)
    count = min(len(train), math.ceil(BLOCKS_PER_COLOUR * k / per_crop))
    picks = np.linspace(0, len(train) - 1, count).round().astype(int)
    colours = block_colours(torch.stack([train[int(i)] for i in picks]), block)
    k = min(k, torch.unique(colours, dim=0).shape[0])
    return kmeans(colours, k, iters=KMEANS_ITERS, seed=seed)


# A process that trains several models on the same data (a notebook, a study, the tests: many
# smoke runs) fits their palette once; the greedy seeding costs about a second at 1024 colours.
_fitted_palettes: dict[tuple, torch.Tensor] = {}


def training_palette(data: Hashable, seed: int, train: Dataset, block: int, codebook_size: int) -> torch.Tensor:
    """``kmeans_palette(train, block, codebook_size, seed)``, fitted once per process for the training
    crops that the data config ``data`` and ``seed`` made (``train``); a copy, so that no caller
    changes what the next one gets."""
    key = (data, seed, block, min(codebook_size, KMEANS_MAX_COLOURS))
    if key not in _fitted_palettes:
        _fitted_palettes[key] = kmeans_palette(train, block, codebook_size, seed)
    return _fitted_palettes[key].clone()


@torch.no_grad()
def block_mean_baseline(
    loader: DataLoader, device: torch.device, block: int, codebook_size: int, palette: torch.Tensor
) -> dict[str, float]:
    """Pixel metrics of three trivial codecs measured like the model: each ``block x block`` patch
    replaced by its mean colour (``baseline/``), by that colour from a uniform RGB palette of at
    most ``codebook_size`` colours, one code per block like the tokenizer's (``baseline_palette/``),
    and by the nearest colour of ``palette`` (``kmeans_palette``: fitted on training crops,
    ``baseline_kmeans/``). ``<prefix>/colors`` is each palette's size."""
    levels = palette_levels(codebook_size)
    palette = palette.to(device)
    exact, uniform, fitted = (ReconstructionMetrics(device) for _ in range(3))
    for images in loader:
        images = images.to(device)
        exact.update_pairs(images, block_mean(images, block))
        uniform.update_pairs(images, block_mean(images, block, levels))
        fitted.update_pairs(images, block_mean_from_palette(images, block, palette))
    metrics = {f"baseline/{k}": v for k, v in exact.compute().items()}
    metrics |= {f"baseline_palette/{k}": v for k, v in uniform.compute().items()}
    metrics |= {f"baseline_kmeans/{k}": v for k, v in fitted.compute().items()}
    return metrics | {"baseline_palette/colors": float(levels**3), "baseline_kmeans/colors": float(len(palette))}
