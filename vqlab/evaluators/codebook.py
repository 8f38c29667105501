"""Code-histogram metrics: usage, perplexity and dead codes, over the whole code and per digit;
and the code-histogram file, written (``CodebookMetrics.save``) and read (``CodeHistogram.read``)
only here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqlab import codes as codes_lib
from vqlab.codes import perplexity
from vqlab.distributed import all_gather_cat, all_reduce_sum, rank
from vqlab.evalconfig import EvalConfig
from vqlab.evaluators.base import Evaluator, registry
from vqlab.models import AutoencoderOutput
from vqlab.runfolder import RunFolder

# From this many codes on, the histogram is a sparse table of the codes seen and their counts
# instead of a dense vector; both give the same metrics.
DENSE_HISTOGRAM_LIMIT = 2**18


@dataclass(frozen=True)
class CodeHistogram:
    """Every code seen in one validation pass, as ``<prefix>codebook_histogram.npz`` holds it (the
    path is ``RunFolder.histogram(prefix)``). ``write`` is the file's only writer and ``read`` its
    only reader (``vqlab.figures``, ``analysis.utilization``, ``analysis.decomposition``).

    digits        (M, G) int64, the digits of each code seen, in ascending flat-index order
    counts        (M,) int64, how often each was seen
    radices       the radices of the G digits (``codebook_size`` is their product)
    digit_counts  per digit i in order, the (radix_i,) int64 histogram of digit i alone; empty
                  when there is one digit
    sparse        whether it was counted sparsely (the content is the same)

    The file holds the same arrays (``radices`` (G,) int64, ``digit_counts_{i}`` one per digit)
    plus, where ``prod(radices)`` fits an int64, ``indices`` (M,) int64 (the flat index of each
    code, ``vqlab.codes``) and ``codebook_size``.
    """

    digits: np.ndarray
    counts: np.ndarray
    radices: tuple[int, ...]
    digit_counts: tuple[np.ndarray, ...] = ()
    sparse: bool = False

    @property
    def codebook_size(self) -> int:
        return codes_lib.codebook_size(self.radices)

    def write(self, path: Path) -> None:
        flat = {}
        if codes_lib.fits_int64(self.radices):
            flat["indices"] = codes_lib.digits_to_index(torch.from_numpy(self.digits), self.radices).numpy()
            flat["codebook_size"] = np.array(self.codebook_size, dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            digits=self.digits,
            counts=self.counts,
            radices=np.array(self.radices, dtype=np.int64),
            sparse=np.array(self.sparse),
            **flat,
            **{f"digit_counts_{i}": counts for i, counts in enumerate(self.digit_counts)},
        )

    @classmethod
    def read(cls, path: Path) -> CodeHistogram:
        """The histogram in the file at ``path``; per-digit histograms in digit order (0, 1, ..., 10, ...)."""
        with np.load(path) as saved:
            per_digit = sum(key.startswith("digit_counts_") for key in saved.files)
            return cls(
                digits=saved["digits"],
                counts=saved["counts"],
                radices=tuple(int(r) for r in saved["radices"]),
                digit_counts=tuple(saved[f"digit_counts_{i}"] for i in range(per_digit)),
                sparse=bool(saved["sparse"]) if "sparse" in saved.files else False,
            )


def merge_counts(keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the counts of equal rows of ``keys`` ``(M, K)``: a sparse histogram, rows ascending."""
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return unique, torch.zeros(len(unique), dtype=counts.dtype, device=counts.device).index_add_(0, inverse, counts)


class CodebookMetrics(Evaluator):
    """Code histogram over the whole evaluation set.

    codebook_usage  distinct codes seen / codebook_size          (in [0, 1])
    perplexity      exp(entropy of the code histogram)           (in [1, codebook_size])
    dead_codes      codebook_size - distinct codes seen          (in [0, codebook_size - 1])
    usage_digit{i}, perplexity_digit{i}, dead_codes_digit{i}: the same for digit (level, group) i
    alone over its radix, when there is more than one digit.

    Codebooks of ``DENSE_HISTOGRAM_LIMIT`` (2^18) codes or more are counted sparsely: a table of
    the codes seen and their counts, merged across ranks (so a code seen on two ranks counts once),
    instead of a dense vector. The table is keyed by flat index where ``prod(radices)`` fits an
    int64, and by the tuple of digits beyond (e.g. RVQ of depth 7 over 1024 codes: 2^70 codes),
    as the quantizers' batch statistics are.
    """

    def __init__(self, radices: tuple[int, ...], device: torch.device, dense_limit: int = DENSE_HISTOGRAM_LIMIT):
        self.radices = tuple(radices)
        self.size = codes_lib.codebook_size(self.radices)
        self.dense = self.size < dense_limit
        self.indexed = codes_lib.fits_int64(self.radices)
        self.device = device
        self.reset()

    def reset(self) -> None:
        per_digit = len(self.radices) > 1
        self.digit_counts = [torch.zeros(r, dtype=torch.int64, device=self.device) for r in self.radices if per_digit]
        if self.dense:
            self.counts = torch.zeros(self.size, dtype=torch.int64, device=self.device)
        else:
            width = 1 if self.indexed else len(self.radices)
            self.keys = torch.zeros(0, width, dtype=torch.int64, device=self.device)
            self.key_counts = torch.zeros(0, dtype=torch.int64, device=self.device)

    def to_keys(self, digits: torch.Tensor) -> torch.Tensor:
        """``(T, G)`` digits -> ``(T, K)`` sparse-table keys whose rows sort in flat-index order:
        the flat index, or the digits most significant (the last) first."""
        if self.indexed:
            return codes_lib.digits_to_index(digits, self.radices)[:, None]
        return digits.flip(-1)

    def to_digits(self, keys: torch.Tensor) -> torch.Tensor:
        if self.indexed:
            return codes_lib.index_to_digits(keys[:, 0], self.radices)
        return keys.flip(-1)

    @torch.no_grad()
    def update(self, images: torch.Tensor, out: AutoencoderOutput) -> None:
        digits = out.quant.codes.reshape(-1, len(self.radices)).to(self.device)
        for i, counts in enumerate(self.digit_counts):
            counts += torch.bincount(digits[:, i], minlength=len(counts))
        if self.dense:
            self.counts += torch.bincount(codes_lib.digits_to_index(digits, self.radices), minlength=self.size)
        else:
            keys = self.to_keys(digits)
            self.keys, self.key_counts = merge_counts(
                torch.cat([self.keys, keys]), torch.cat([self.key_counts, keys.new_ones(len(keys))])
            )

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``(digits (M, G), counts (M,))`` of the codes seen on all ranks, in ascending
        flat-index order."""
        if self.dense:
            counts = all_reduce_sum(self.counts)
            used = counts.nonzero().squeeze(1)
            return codes_lib.index_to_digits(used, self.radices), counts[used]
        keys, counts = merge_counts(all_gather_cat(self.keys), all_gather_cat(self.key_counts))
        return self.to_digits(keys), counts

    def compute(self) -> dict[str, float]:
        used, counts = self.histogram()
        if counts.sum() == 0:
            raise RuntimeError("CodebookMetrics.compute() before any update()")
        metrics = {
            "codebook_usage": len(used) / self.size,
            "perplexity": perplexity(counts).item(),
            "dead_codes": float(self.size - len(used)),
        }
        for i, local in enumerate(self.digit_counts):
            digit = all_reduce_sum(local)
            seen = (digit > 0).sum().item()
            metrics[f"usage_digit{i}"] = seen / len(digit)
            metrics[f"perplexity_digit{i}"] = perplexity(digit).item()
            metrics[f"dead_codes_digit{i}"] = float(len(digit) - seen)
        return metrics

    def save(self, folder: Path, prefix: str = "") -> list[Path]:
        """``<prefix>codebook_histogram.npz`` (``CodeHistogram``), every code seen over the whole
        set (all ranks)."""
        digits, counts = self.histogram()
        per_digit = [all_reduce_sum(c) for c in self.digit_counts]
        if rank() != 0:
            return []
        path = RunFolder(folder).histogram(prefix)
        CodeHistogram(
            digits=digits.cpu().numpy(),
            counts=counts.cpu().numpy(),
            radices=self.radices,
            digit_counts=tuple(d.cpu().numpy() for d in per_digit),
            sparse=not self.dense,
        ).write(path)
        return [path]


@registry.register("codebook")
def _codebook(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    return CodebookMetrics(radices, device)
