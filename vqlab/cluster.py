"""Clustering on torch tensors: squared distances, chunked nearest-centroid search and k-means.

``kmeans`` seeds with greedy k-means++ (Arthur & Vassilvitskii, "k-means++: The Advantages of
Careful Seeding", SODA 2007, with the ``2 + log k`` local trials of scikit-learn's
``kmeans_plusplus``) and runs Lloyd iterations; ``spherical`` clusters directions (cosine
similarity): points and centroids are l2-normalised. Every step is deterministic given ``seed``,
so identical inputs give bit-identical centroids (DDP ranks clustering the same gathered latents
agree). Used by the codebook quantizers' k-means initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 16384  # rows per distance block, bounding memory to CHUNK x k floats


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(M, d), (K, d) -> (M, K)`` squared Euclidean distances (may dip below 0 by rounding)."""
    return x.square().sum(-1, keepdim=True) - 2 * x @ centroids.T + centroids.square().sum(-1)


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """``(M, d) -> (M,)`` index of the nearest centroid, ``chunk`` rows at a time so that M may be large."""
    return torch.cat([squared_distances(block, centroids).argmin(-1) for block in x.split(chunk)])


def inertia(x: torch.Tensor, centroids: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Sum of squared distances from each point to its nearest centroid (the k-means objective)."""
    return sum(squared_distances(block, centroids).min(-1).values.clamp_min(0).sum() for block in x.split(chunk))


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``(M, d) -> (k, d)`` greedy k-means++ seeds: each new seed is the best of ``2 + log k``
    candidates drawn with probability proportional to the squared distance to the seeds so far."""
    trials = 2 + int(math.log(k))
    first = torch.randint(x.shape[0], (1,), generator=generator, device=x.device)
    centroids = x[first].repeat(k, 1)  # (k, d)
    closest = squared_distances(x, centroids[:1])[:, 0].clamp_min(0)  # (M,)
    for i in range(1, k):
        # When every point already coincides with a seed, fall back to a uniform draw.
        weights = closest + (closest.sum() == 0).to(closest.dtype)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)  # (trials,)
        distances = torch.minimum(closest[:, None], squared_distances(x, x[candidates]).clamp_min(0))  # (M, trials)
        best = distances.sum(0).argmin()
        centroids[i] = x[candidates[best]]
        closest = distances[:, best]
    return centroids


def kmeans(x: torch.Tensor, k: int, iters: int = 10, spherical: bool = False, seed: int = 0) -> torch.Tensor:
    """``(M, d) -> (k, d)`` centroids: greedy k-means++ seeding, then ``iters`` Lloyd steps. A
    cluster that empties keeps its previous centroid. With fewer than ``k`` distinct points some
    centroids coincide; callers that need ``k`` distinct ones give at least ``k`` points."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty (M, d) tensor, got {tuple(x.shape)}")
    if k < 1 or iters < 0:
        raise ValueError(f"kmeans needs k >= 1 and iters >= 0, got k={k}, iters={iters}")
    if spherical:
        x = F.normalize(x, dim=-1)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    centroids = kmeans_plusplus(x, k, generator)
    for _ in range(iters):
        assignment = nearest(x, centroids)  # (M,)
        counts = torch.bincount(assignment, minlength=k).to(x.dtype)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)  # (k, d)
        means = sums / counts.clamp_min(1)[:, None]
        if spherical:
            means = F.normalize(means, dim=-1)
        centroids = torch.where(counts[:, None] > 0, means, centroids)
    return centroids
