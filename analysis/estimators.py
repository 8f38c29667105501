"""Estimators of the information in codes, corrected for the sample they are measured on.

- Entropies are Miller–Madow's (``vqlab.evaluators.codebook.miller_madow_bits``, the one used for
  the codebook evaluator's measured rate): the plug-in entropy plus ``(m̂ − 1) / (2N)`` nats, ``m̂``
  the bins seen. Miller, "Note on the bias of information estimates", in Quastler (ed.), Information
  Theory in Psychology, 1955.
- Mutual information between two digits is the plug-in ``H(a) + H(b) − H(a, b)``, which is positive
  on any finite sample even for independent digits (about ``(r_a − 1)(r_b − 1) / (2N ln 2)`` bits).
  Its **shuffle null** is the same quantity after each digit column is permuted independently
  (seeded, averaged over ``permutations``): the marginals are kept and any dependence is broken, so
  the null is what the sample alone gives. The corrected MI is the raw MI minus the null.
- Intervals are bootstraps over crops: the crops (groups of tokens, which are not independent of
  each other inside a crop) are resampled with replacement, never the tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vqlab.evaluators.codebook import miller_madow_bits

PERMUTATIONS = 5  # shuffle nulls averaged: the null's own spread falls as 1 / sqrt(permutations)
RESAMPLES = 200  # bootstrap resamples of the crops
CONFIDENCE = 0.95


def plugin_bits(counts: np.ndarray) -> float:
    """The plug-in (maximum-likelihood) entropy in bits of a histogram."""
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def entropies(codes: torch.Tensor, radices: tuple[int, ...]) -> list[float]:
    """``(M, G)`` digits -> the Miller–Madow entropy in bits of each digit."""
    return [float(miller_madow_bits(np.bincount(codes[:, i].numpy(), minlength=r))) for i, r in enumerate(radices)]


def pair_information(a: np.ndarray, b: np.ndarray, radix_b: int) -> float:
    """Plug-in mutual information in bits between two ``(M,)`` digit columns."""
    joint = np.bincount(a * radix_b + b)
    return plugin_bits(np.bincount(a)) + plugin_bits(np.bincount(b)) - plugin_bits(joint)


def information(
    codes: torch.Tensor, radices: tuple[int, ...], permutations: int = PERMUTATIONS, seed: int = 0
) -> dict[str, np.ndarray]:
    """``(M, G)`` digits -> three ``(G, G)`` matrices in bits, zero on the diagonal: ``raw`` the
    plug-in MI of every two digits, ``null`` its mean over ``permutations`` independent shuffles of
    the digit columns (seeded with ``seed``), ``corrected = raw − null``."""
    columns = codes.numpy().T  # (G, M)
    groups = len(radices)
    rng = np.random.default_rng(seed)
    shuffled = [np.stack([rng.permutation(column) for column in columns]) for _ in range(permutations)]
    raw, null = np.zeros((groups, groups)), np.zeros((groups, groups))
    for i in range(groups):
        for j in range(i + 1, groups):
            raw[i, j] = raw[j, i] = pair_information(columns[i], columns[j], radices[j])
            nulls = [pair_information(s[i], s[j], radices[j]) for s in shuffled]
            null[i, j] = null[j, i] = float(np.mean(nulls))
    return {"raw": raw, "null": null, "corrected": raw - null}


def bootstrap_over_crops(
    codes: torch.Tensor,
    statistic: Callable[[torch.Tensor], np.ndarray | float],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(C, L, G)`` codes of C crops -> ``statistic`` of their ``(C·L, G)`` tokens and its 95%
    bootstrap interval over crops: ``(estimate, low, high)``, arrays of the statistic's shape.

    Crops are drawn with replacement (a seeded generator). A crop drawn twice repeats its tokens,
    which alone moves a plug-in estimate (entropies down, MI up), so, as the measured rate's
    interval (``vqlab.evaluators.codebook.measured_rate``), the interval is the percentile
    interval less the bootstrap's mean shift: the spread of the statistic over crops, centred on the
    estimate. Fewer than two crops have no interval (``NaN``)."""
    estimate = np.asarray(statistic(codes.flatten(0, 1)), dtype=np.float64)
    if len(codes) < 2:
        return estimate, np.full_like(estimate, np.nan), np.full_like(estimate, np.nan)
    rng = np.random.default_rng(seed)
    draws = np.stack(
        [
            np.asarray(statistic(codes[torch.from_numpy(rng.integers(len(codes), size=len(codes)))].flatten(0, 1)))
            for _ in range(resamples)
        ]
    )  # (resamples, *shape)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    shift = draws.mean(0) - estimate
    return estimate, low - shift, high - shift
