"""Code-histogram metrics: usage, perplexity and dead codes, over the whole code and per digit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vqlab import codes as codes_lib
from vqlab.config import EvalConfig
from vqlab.distributed import all_gather_cat, all_reduce_sum, rank
from vqlab.evaluators.base import Evaluator, registry
from vqlab.models import AutoencoderOutput
from vqlab.quantizers.base import perplexity

# From this many codes on, the histogram is a sparse (sorted unique index, count) table instead of
# a dense vector; both give the same metrics.
DENSE_HISTOGRAM_LIMIT = 2**18


def merge_counts(indices: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the counts of equal indices: a sorted sparse histogram."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    return unique, torch.zeros_like(unique).index_add_(0, inverse, counts)


class CodebookMetrics(Evaluator):
    """Code histogram over the whole evaluation set.

    codebook_usage  distinct codes seen / codebook_size          (in [0, 1])
    perplexity      exp(entropy of the code histogram)           (in [1, codebook_size])
    dead_codes      codebook_size - distinct codes seen          (in [0, codebook_size - 1])
    usage_digit{i}, perplexity_digit{i}, dead_codes_digit{i}: the same for digit (level, group) i
    alone over its radix, when there is more than one digit.

    Codebooks of ``DENSE_HISTOGRAM_LIMIT`` (2^18) codes or more are counted sparsely: a sorted
    table of the indices seen and their counts, merged across ranks, instead of a dense vector.
    """

    def __init__(self, radices: tuple[int, ...], device: torch.device, dense_limit: int = DENSE_HISTOGRAM_LIMIT):
        self.radices = tuple(radices)
        self.size = codes_lib.codebook_size(self.radices)
        self.dense = self.size < dense_limit
        self.device = device
        self.reset()

    def reset(self) -> None:
        per_digit = len(self.radices) > 1
        self.digit_counts = [torch.zeros(r, dtype=torch.int64, device=self.device) for r in self.radices if per_digit]
        if self.dense:
            self.counts = torch.zeros(self.size, dtype=torch.int64, device=self.device)
        else:
            self.indices = torch.zeros(0, dtype=torch.int64, device=self.device)
            self.index_counts = torch.zeros(0, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, images: torch.Tensor, out: AutoencoderOutput) -> None:
        digits = out.quant.codes.reshape(-1, len(self.radices)).to(self.device)
        for i, counts in enumerate(self.digit_counts):
            counts += torch.bincount(digits[:, i], minlength=len(counts))
        index = codes_lib.digits_to_index(digits, self.radices)
        if self.dense:
            self.counts += torch.bincount(index, minlength=self.size)
        else:
            self.indices, self.index_counts = merge_counts(
                torch.cat([self.indices, index]), torch.cat([self.index_counts, torch.ones_like(index)])
            )

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``(indices, counts)`` of the codes seen (all ranks), indices ascending."""
        if self.dense:
            counts = all_reduce_sum(self.counts)
            used = counts.nonzero().squeeze(1)
            return used, counts[used]
        return merge_counts(all_gather_cat(self.indices), all_gather_cat(self.index_counts))

    def compute(self) -> dict[str, float]:
        used, counts = self.histogram()
        if counts.sum() == 0:
            raise RuntimeError("CodebookMetrics.compute() before any update()")
        metrics = {
            "codebook_usage": used.numel() / self.size,
            "perplexity": perplexity(counts).item(),
            "dead_codes": float(self.size - used.numel()),
        }
        for i, local in enumerate(self.digit_counts):
            digit = all_reduce_sum(local)
            seen = (digit > 0).sum().item()
            metrics[f"usage_digit{i}"] = seen / len(digit)
            metrics[f"perplexity_digit{i}"] = perplexity(digit).item()
            metrics[f"dead_codes_digit{i}"] = float(len(digit) - seen)
        return metrics

    def save(self, folder: Path, prefix: str = "") -> list[Path]:
        """``<prefix>codebook_histogram.npz``: ``indices`` and ``counts`` of every code seen (flat
        index per vqlab.codes), ``radices``, ``codebook_size``, ``digit_counts_{i}``, ``sparse``."""
        indices, counts = self.histogram()
        digits = [all_reduce_sum(c) for c in self.digit_counts]
        if rank() != 0:
            return []
        path = Path(folder) / f"{prefix}codebook_histogram.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            indices=indices.cpu().numpy(),
            counts=counts.cpu().numpy(),
            radices=np.array(self.radices, dtype=np.int64),
            codebook_size=np.array(self.size, dtype=np.int64),
            sparse=np.array(not self.dense),
            **{f"digit_counts_{i}": d.cpu().numpy() for i, d in enumerate(digits)},
        )
        return [path]


@registry.register("codebook")
def _codebook(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    return CodebookMetrics(radices, device)
