"""Evaluators: ``update(images, reconstructions, codes)`` / ``compute() -> dict`` / ``reset()``.

States are sums and counts (or histograms) that are all-reduced across ranks inside ``compute``,
so a metric is always the whole evaluation set's, never an average of per-rank values. Every
evaluator is named in ``eval.metrics`` and registered here.

Conventions: images arrive in [-1, 1]; reconstructions are clamped to [-1, 1] (what saving them
as an image would do) and both are mapped to [0, 1] before pixel metrics.
"""

from __future__ import annotations

import math

import torch

from vqlab import codes as codes_lib
from vqlab.distributed import all_gather_cat, all_reduce_sum
from vqlab.registry import Registry

registry = Registry("evaluator")

# Above this many codes a dense histogram is replaced by a sparse (sorted unique) one.
DENSE_HISTOGRAM_LIMIT = 2**22


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in fp32, clamped."""
    return images.float().clamp(-1, 1).add(1).div(2)


class Evaluator:
    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class ReconstructionMetrics(Evaluator):
    """Per-image pixel metrics on [0, 1] images, averaged over the evaluation set.

    l1   mean |x - y|                      (0 is perfect, at most 1)
    mse  mean (x - y)^2                    (0 is perfect, at most 1)
    psnr 10 log10(1 / mse) per image, dB   (higher is better; an exact image counts as 100 dB)
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # l1, mse, psnr, count

    @torch.no_grad()
    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        x, y = to_unit(images), to_unit(reconstructions)
        diff = (x - y).flatten(1).double()
        mse = diff.square().mean(1)
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        batch = torch.stack(
            [
                diff.abs().mean(1).sum(),
                mse.sum(),
                psnr.sum(),
                torch.tensor(float(len(x)), device=x.device, dtype=torch.float64),
            ]
        )
        self.sums += batch.to(self.device)

    def compute(self) -> dict[str, float]:
        l1, mse, psnr, count = all_reduce_sum(self.sums).tolist()
        if count == 0:
            raise RuntimeError("ReconstructionMetrics.compute() before any update()")
        return {"l1": l1 / count, "mse": mse / count, "psnr": psnr / count}


class CodebookMetrics(Evaluator):
    """Code histogram over the whole evaluation set.

    codebook_usage  distinct codes seen / codebook_size          (in [0, 1])
    perplexity      exp(entropy of the code histogram)           (in [1, codebook_size])
    dead_codes      codebook_size - distinct codes seen
    usage_digit{i}, perplexity_digit{i}: the same for digit i alone, when there is more than one.

    Codebooks above ``DENSE_HISTOGRAM_LIMIT`` codes are counted sparsely (sorted unique indices).
    """

    def __init__(self, radices: tuple[int, ...], device: torch.device):
        self.radices = tuple(radices)
        self.size = codes_lib.codebook_size(self.radices)
        self.dense = self.size <= DENSE_HISTOGRAM_LIMIT
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.digit_counts = [torch.zeros(r, dtype=torch.int64, device=self.device) for r in self.radices]
        if self.dense:
            self.counts = torch.zeros(self.size, dtype=torch.int64, device=self.device)
        else:
            self.seen: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor) -> None:
        digits = codes.reshape(-1, len(self.radices)).to(self.device)
        for i, radix in enumerate(self.radices):
            self.digit_counts[i] += torch.bincount(digits[:, i], minlength=radix)
        if self.dense:
            self.counts += torch.bincount(codes_lib.digits_to_index(digits, self.radices), minlength=self.size)
        else:
            self.seen.append(torch.unique(codes_lib.digits_to_index(digits, self.radices)))

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``(indices, counts)`` of the codes seen (all ranks)."""
        if self.dense:
            counts = all_reduce_sum(self.counts)
            used = counts.nonzero().squeeze(1)
            return used, counts[used]
        local = torch.cat(self.seen) if self.seen else torch.zeros(0, dtype=torch.int64, device=self.device)
        local = all_gather_cat(local)
        used = torch.unique(local)
        return used, torch.ones_like(used)  # the sparse path tracks presence, not frequency

    def compute(self) -> dict[str, float]:
        used, counts = self.histogram()
        metrics = {"codebook_usage": used.numel() / self.size, "dead_codes": float(self.size - used.numel())}
        if self.dense:
            metrics["perplexity"] = perplexity(counts)
        if len(self.radices) > 1:
            for i, radix in enumerate(self.radices):
                digit = all_reduce_sum(self.digit_counts[i])
                metrics[f"usage_digit{i}"] = (digit > 0).sum().item() / radix
                metrics[f"perplexity_digit{i}"] = perplexity(digit)
        return metrics


def perplexity(counts: torch.Tensor) -> float:
    counts = counts[counts > 0].double()
    if counts.numel() == 0:
        return math.nan
    p = counts / counts.sum()
    return math.exp(-(p * p.log()).sum().item())


registry.register("reconstruction")(lambda radices, device: ReconstructionMetrics(device))
registry.register("codebook")(lambda radices, device: CodebookMetrics(radices, device))


def build(names: tuple[str, ...], radices: tuple[int, ...], device: torch.device) -> dict[str, Evaluator]:
    """The named evaluators; a continuous quantizer (no radices) has no codebook to measure."""
    return {
        name: registry.get(name).builder(radices=radices, device=device)
        for name in names
        if radices or name != "codebook"
    }


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
