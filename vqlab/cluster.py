"""Clustering on torch tensors: exact nearest-centroid search in bounded memory, and k-means.

``nearest`` never holds the ``(M, K)`` distance matrix: it walks blocks of points and of
centroids with a running minimum, so memory is one block of distances whatever M and K
(``CHUNK_ELEMENTS`` on a GPU, fewer on a CPU, where a block that stays in cache is faster).
``kmeans`` seeds with greedy k-means++ (Arthur & Vassilvitskii, "k-means++: The Advantages of
Careful Seeding", SODA 2007, with the ``2 + log k`` local trials of scikit-learn's
``kmeans_plusplus``) up to ``GREEDY_SEEDING_MAX`` centroids, and above that with k-means||
(Bahmani et al., "Scalable K-Means++", VLDB 2012, https://arxiv.org/abs/1203.6402), whose rounds
are vectorised where greedy seeding takes k sequential steps. Then Lloyd iterations, or, with
``batch_size``, mini-batch updates (Sculley, "Web-Scale K-Means Clustering", WWW 2010) whose cost
does not grow with the number of points. ``spherical`` clusters directions (cosine similarity).
Every step is deterministic given ``seed``, so identical inputs give bit-identical centroids (DDP
ranks clustering the same gathered latents agree). Used by the codebook quantizers' k-means
initialisation and the analysis studies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**24  # distances held at once by nearest on a GPU (64 MiB in fp32), whatever M and K
# On a CPU a block that stays in cache is faster: at 2^20 distances (4 MiB) the search took 0.4 to
# 0.7 of its time at 2^24, from 8192 x 1024 codes of dimension 256 to 16384 x 4096 of dimension 32.
CPU_CHUNK_ELEMENTS = 2**20
GREEDY_SEEDING_MAX = 4096  # greedy k-means++ takes k sequential steps: seconds here, minutes at 2^16
PARALLEL_ROUNDS = 5  # k-means|| rounds; the paper finds 5 enough (its Section 5)


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(M, d), (K, d) -> (M, K)`` squared Euclidean distances (may dip below 0 by rounding)."""
    return x.square().sum(-1, keepdim=True) - 2 * x @ centroids.T + centroids.square().sum(-1)


def blocks(m: int, k: int, elements: int) -> tuple[int, int]:
    """Rows and centroids per block so that a block holds at most ``elements`` distances (at
    least one of each): all centroids at once when ``elements`` allows 1024 rows of them."""
    codes = min(k, max(1, elements // min(m, 1024)))
    return max(1, elements // codes), codes


def block_elements(device: torch.device) -> int:
    """How many distances ``nearest`` holds at once by default on ``device``."""
    return CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS


def nearest_with_distances(
    x: torch.Tensor, centroids: torch.Tensor, elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, d), (K, d) -> (M,), (M,)``: the index of each point's nearest centroid (the lowest index
    among exact ties, as ``argmin``) and the squared distance to it, holding at most ``elements``
    distances at a time (``block_elements`` of the device by default). Both sides are moved to the
    centroids' mean first: distances do not change, but ``‖x‖² − 2x·c + ‖c‖²`` would lose the digits
    that tell codes apart when latents sit far from the origin. ``‖x‖²`` is the same for every
    centroid, so the search ranks ``‖c‖² − 2x·c``; the returned distance is recomputed from the
    difference, exactly."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    centre = centroids.to(dtype).mean(0)
    points, codes = x.to(dtype) - centre, centroids.to(dtype) - centre  # (M, d), (K, d)
    norms = codes.square().sum(-1)  # (K,)
    rows, width = blocks(points.shape[0], codes.shape[0], elements or block_elements(x.device))
    index = torch.empty(points.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, points.shape[0], rows):
        block = points[start : start + rows]  # (r, d)
        best = torch.full((block.shape[0],), math.inf, dtype=dtype, device=x.device)
        chosen = torch.zeros(block.shape[0], dtype=torch.long, device=x.device)
        for first in range(0, codes.shape[0], width):
            # ‖c‖² − 2x·c in the matrix product's own epilogue: no extra pass over the block
            scores = torch.addmm(
                norms[first : first + width], block, codes[first : first + width].T, alpha=-2
            )  # (r, w)
            value, position = scores.min(-1)
            better = value < best  # strict: an earlier block keeps a tie, as argmin does
            best = torch.where(better, value, best)
            chosen = torch.where(better, position + first, chosen)
        index[start : start + rows] = chosen
    distances = (points - codes[index]).square().sum(-1)
    return index, distances


def nearest(x: torch.Tensor, centroids: torch.Tensor, elements: int | None = None) -> torch.Tensor:
    """``(M, d), (K, d) -> (M,)`` index of the nearest centroid, in bounded memory (``nearest_with_distances``)."""
    return nearest_with_distances(x, centroids, elements)[0]


def inertia(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Sum of squared distances from each point to its nearest centroid (the k-means objective)."""
    return nearest_with_distances(x, centroids)[1].sum()


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


def kmeans_parallel(x: torch.Tensor, k: int, generator: torch.Generator, rounds: int = PARALLEL_ROUNDS) -> torch.Tensor:
    """``(M, d) -> (k, d)`` k-means|| seeds: each round keeps every point independently with
    probability ``2k·D²(x) / Σ D²`` (D the distance to the candidates so far), all at once. The
    candidates (about ``2k`` per round) are then reduced to ``k``: drawn without replacement in
    proportion to the number of points nearest to each, then moved by weighted Lloyd steps on the
    candidates: the paper's weighted reclustering, without the k sequential steps of k-means++."""
    m = x.shape[0]
    kept = torch.zeros(m, dtype=torch.bool, device=x.device)
    kept[torch.randint(m, (1,), generator=generator, device=x.device)] = True
    closest = nearest_with_distances(x, x[kept])[1]  # (M,)
    for _ in range(rounds):
        cost = closest.sum()
        if cost == 0:
            break
        draw = torch.rand(m, generator=generator, device=x.device, dtype=closest.dtype)
        new = (draw < 2 * k * closest / cost) & ~kept
        if new.any():
            kept |= new
            closest = torch.minimum(closest, nearest_with_distances(x, x[new])[1])
    candidates = x[kept]  # (C, d)
    weights = torch.bincount(nearest(x, candidates), minlength=candidates.shape[0]).to(torch.float32)  # (C,)
    if int((weights > 0).sum()) < k:
        # fewer distinct candidates than seeds: every one of them, then points drawn uniformly
        extra = torch.randint(m, (k - int((weights > 0).sum()),), generator=generator, device=x.device)
        return torch.cat([candidates[weights > 0], x[extra]])
    return batched_plusplus(candidates, weights, k, generator)


def batched_plusplus(points: torch.Tensor, weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``(C, d), (C,) -> (k, d)`` k-means++ on weighted points in ``log2 k`` steps instead of k:
    step i draws as many new seeds as there are seeds so far, without replacement, in proportion
    to weight times squared distance to those seeds."""
    chosen = torch.multinomial(weights, 1, generator=generator)  # (1,)
    closest = nearest_with_distances(points, points[chosen])[1]  # (C,)
    while chosen.shape[0] < k:
        score = weights * closest
        available = int((score > 0).sum())
        if available == 0:
            break
        count = min(chosen.shape[0], k - chosen.shape[0], available)
        new = torch.multinomial(score, count, replacement=False, generator=generator)
        chosen = torch.cat([chosen, new])
        closest = torch.minimum(closest, nearest_with_distances(points, points[new])[1])
    if chosen.shape[0] < k:  # every point is a seed already: repeat the heaviest
        chosen = torch.cat([chosen, weights.argsort(descending=True)[: k - chosen.shape[0]]])
    return points[chosen]


def assigned_sums(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k,)`` how many points of ``x`` are nearest to each centroid, and ``(k, d)`` their sums."""
    assignment = nearest(x, centroids)  # (M,)
    counts = torch.bincount(assignment, minlength=centroids.shape[0]).to(x.dtype)
    return counts, torch.zeros_like(centroids).index_add_(0, assignment, x)


def lloyd_step(x: torch.Tensor, centroids: torch.Tensor, spherical: bool) -> torch.Tensor:
    """One Lloyd iteration: every centroid moves to the mean of its points (an empty one stays)."""
    counts, sums = assigned_sums(x, centroids)
    means = sums / counts.clamp_min(1)[:, None]
    if spherical:
        means = F.normalize(means, dim=-1)
    return torch.where(counts[:, None] > 0, means, centroids)


def minibatch_epoch(
    x: torch.Tensor,
    centroids: torch.Tensor,
    seen: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    spherical: bool,
) -> torch.Tensor:
    """One pass over ``x`` in shuffled mini-batches (Sculley 2010): each centroid moves towards the
    batch's points assigned to it with a rate of one over the points it has seen (``seen``, updated
    in place), so it is always the running mean of every point ever assigned to it."""
    order = torch.randperm(x.shape[0], generator=generator, device=x.device)
    for batch in x[order].split(batch_size):
        counts, sums = assigned_sums(batch, centroids)
        seen += counts
        moved = centroids + (sums - counts[:, None] * centroids) / seen.clamp_min(1)[:, None]
        if spherical:
            moved = F.normalize(moved, dim=-1)
        centroids = torch.where(counts[:, None] > 0, moved, centroids)
    return centroids


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    spherical: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """``(M, d) -> (k, d)`` centroids: k-means++ seeding (k-means|| above ``GREEDY_SEEDING_MAX``
    centroids), then ``iters`` Lloyd steps, or, with ``batch_size``, ``iters`` mini-batch passes
    over the points (many small updates per pass: fewer passes converge). A cluster that empties
    keeps its previous centroid. With fewer than ``k`` distinct points some centroids coincide;
    callers that need ``k`` distinct ones give at least ``k`` points."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty (M, d) tensor, got {tuple(x.shape)}")
    if k < 1 or iters < 0:
        raise ValueError(f"kmeans needs k >= 1 and iters >= 0, got k={k}, iters={iters}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"kmeans needs batch_size >= 1 (or None for Lloyd steps), got {batch_size}")
    if spherical:
        x = F.normalize(x, dim=-1)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    seeding = kmeans_plusplus if k <= GREEDY_SEEDING_MAX else kmeans_parallel
    centroids = seeding(x, k, generator)
    seen = torch.zeros(k, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        if batch_size is None:
            centroids = lloyd_step(x, centroids, spherical)
        else:
            centroids = minibatch_epoch(x, centroids, seen, batch_size, generator, spherical)
    return centroids
