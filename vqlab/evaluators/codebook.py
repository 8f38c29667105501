"""Code-histogram metrics: usage, perplexity and dead codes, over the whole code and per digit;
the measured rate of the codes (``measured_rate``); and the code-histogram file, written
(``CodebookMetrics.save``) and read (``CodeHistogram.read``) only here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import sparse, stats

from vqlab import codes as codes_lib
from vqlab.codes import perplexity
from vqlab.distributed import all_gather_cat, all_reduce_sum, rank, world_size
from vqlab.evalconfig import EvalConfig
from vqlab.evaluators.base import Evaluator, registry
from vqlab.models import AutoencoderOutput
from vqlab.runfolder import RunFolder

# From this many codes on, the histogram is a sparse table of the codes seen and their counts
# instead of a dense vector; both give the same metrics.
DENSE_HISTOGRAM_LIMIT = 2**18
RATE_RESAMPLES = 1000  # of the bootstrap over crops (``measured_rate``)
RATE_CONFIDENCE = 0.95


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


def miller_madow_bits(counts: np.ndarray) -> np.ndarray:
    """The Miller-Madow entropy, in bits, of each histogram along the last axis of ``counts``: the
    plug-in entropy plus ``(m - 1) / (2 N ln 2)``, ``m`` the codes seen and ``N`` the count. The
    plug-in alone underestimates by about the added term when many codes are seen once or twice."""
    counts = np.asarray(counts, dtype=np.float64)
    seen, total = (counts > 0).sum(-1), counts.sum(-1)
    return stats.entropy(counts, base=2, axis=-1) + (seen - 1) / (2 * total * np.log(2))


def measured_rate(
    crops: np.ndarray, codes: np.ndarray, resamples: int = RATE_RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """The rate of a set of codes in bits per token, ``(estimate, low, high)``: the Miller-Madow
    entropy of the codes of every token, and a 95% bootstrap interval over crops, resampled with
    replacement (``scipy.stats.bootstrap``, percentile, a generator seeded with ``seed``).

    ``crops`` ``(T,)``: the crop of each token (any integers; the resampling indexes the crops in
    their ascending order); ``codes`` ``(T,)`` or ``(T, K)``: each token's code, as an integer or
    a row of integers (the digits of a code whose flat index does not fit an int64).

    A crop drawn twice repeats its codes, which alone lowers an entropy estimate (with 8192 tokens
    of uniform codes, by 0.1 bit over 1000 codes and 0.8 bit over 2^14): the percentile interval
    would lie wholly below the estimate. So the interval is the bootstrap's spread centred on the
    estimate (the percentile interval less the bootstrap's mean shift): how much the rate moves
    with the crops, not how far it lies from the source's entropy, which a set of N tokens bounds
    (the plug-in entropy is at most log2 N). Fewer than two crops have no interval (``NaN``).
    1000 resamples take 0.1-0.3 s for 512 crops of 16 tokens, about 10 s for 50000 of 256."""
    named, crop = np.unique(crops, return_inverse=True)
    crop, crop_count = crop.reshape(-1), len(named)
    code = np.unique(codes, axis=0, return_inverse=True)[1].reshape(-1)
    # crop x code histogram: a resample's histogram is its crop multiplicities times this
    table = sparse.csr_array((np.ones(len(code)), (crop, code)), shape=(crop_count, int(code.max()) + 1))
    estimate = float(miller_madow_bits(table.sum(0)))
    if crop_count < 2:
        return estimate, float("nan"), float("nan")

    def rate(drawn: np.ndarray, axis: int = -1) -> np.ndarray:  # scipy passes ``axis``: always the last
        drawn = drawn.reshape(-1, crop_count)
        rows = np.arange(len(drawn))[:, None] * crop_count
        times = np.bincount((rows + drawn).reshape(-1), minlength=drawn.size).reshape(drawn.shape)
        return miller_madow_bits((table.T @ times.T).T)

    found = stats.bootstrap(
        (np.arange(crop_count),),
        rate,
        vectorized=True,
        n_resamples=resamples,
        batch=max(1, 2**22 // (crop_count + table.shape[1])),  # about 32 MB of histograms at a time
        confidence_level=RATE_CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    shift = float(found.bootstrap_distribution.mean()) - estimate
    return estimate, float(found.confidence_interval.low) - shift, float(found.confidence_interval.high) - shift


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
    measured_bits   the rate of the codes in bits per token: Miller-Madow entropy of the whole
                    code over every token (``measured_rate``)  (in [0, log2 tokens + 0.73))
    measured_bits_low, measured_bits_high: its 95% bootstrap interval over the crops (images),
                    which every rank computes from the crops of all ranks in dataset order (rank
                    ``r`` of ``w`` holds crops ``r, r + w, ...``, as ``data.ShardSampler`` deals
                    them), so any number of ranks gives one process's numbers.

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
        width = 1 if self.indexed else len(self.radices)
        # every token's code key and its crop's position on this rank, for the rate over crops
        self.token_keys = [torch.zeros(0, width, dtype=torch.int64, device=self.device)]
        self.token_crops = [torch.zeros(0, dtype=torch.int64, device=self.device)]
        self.crops = 0
        per_digit = len(self.radices) > 1
        self.digit_counts = [torch.zeros(r, dtype=torch.int64, device=self.device) for r in self.radices if per_digit]
        if self.dense:
            self.counts = torch.zeros(self.size, dtype=torch.int64, device=self.device)
        else:
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
        batch, tokens = out.quant.codes.shape[:2]
        digits = out.quant.codes.reshape(-1, len(self.radices)).to(self.device)
        for i, counts in enumerate(self.digit_counts):
            counts += torch.bincount(digits[:, i], minlength=len(counts))
        keys = self.to_keys(digits)
        self.token_keys.append(keys)
        crops = torch.arange(self.crops, self.crops + batch, device=self.device)
        self.token_crops.append(crops.repeat_interleave(tokens))
        self.crops += batch
        if self.dense:
            self.counts += torch.bincount(keys[:, 0], minlength=self.size)
        else:
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
        estimate, low, high = measured_rate(*self.tokens())
        metrics["measured_bits"] = estimate
        if not np.isnan(low):
            metrics |= {"measured_bits_low": low, "measured_bits_high": high}
        return metrics

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """``(crops (T,), keys (T, K))`` of every token on all ranks: its crop's position in the
        dataset, and its sparse-table key (``to_keys``)."""
        crops = rank() + world_size() * torch.cat(self.token_crops)
        return all_gather_cat(crops).cpu().numpy(), all_gather_cat(torch.cat(self.token_keys)).cpu().numpy()

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
