"""Evaluators: ``update(images, reconstructions, codes)`` / ``compute() -> dict`` / ``reset()``.

The same evaluators serve training-time validation (``vqlab.trainer.evaluate``) and
``python -m vqlab.evaluate``. Each is registered by the name used in ``eval.metrics``:

    reconstruction  l1, mse, psnr, ssim          pixel metrics on [0, 1] images
    codebook        codebook_usage, perplexity, dead_codes (+ per digit)
    lpips           lpips (alex) | lpips_vgg | lpips_squeeze, on [-1, 1] images
    fid             fid, isc, isc_std, kid, kid_std (torch-fidelity's Inception)
    swd             swd_<size> per pyramid level and swd, their mean (no weights needed)

States are sums and counts (or histograms) all-reduced across ranks, or feature sets gathered
from every rank, inside ``compute``: a metric is always the whole evaluation set's, never an
average of per-rank values. ``reset`` starts a new evaluation.

Conventions: images arrive in [-1, 1]; reconstructions are clamped to [-1, 1] (what saving them
as an image would do). Pixel metrics map both to [0, 1]; LPIPS takes [-1, 1]; Inception and SWD
take the uint8 [0, 255] images a PNG would hold.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from vqlab import codes as codes_lib
from vqlab import weights
from vqlab.codes import perplexity
from vqlab.config import EvalConfig
from vqlab.distributed import all_gather_cat, all_gather_objects, all_reduce_sum, rank, world_size
from vqlab.metrics import fidelity
from vqlab.metrics import swd as swd_lib
from vqlab.registry import Registry

registry = Registry("evaluator")

# From this many codes on, the histogram is a sparse (sorted unique index, count) table instead of
# a dense vector; both give the same metrics.
DENSE_HISTOGRAM_LIMIT = 2**18
# skimage's and torchmetrics' Gaussian window: sigma 1.5 truncated at 3.5 sigma.
SSIM_WINDOW = 11


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in fp32, clamped."""
    return images.float().clamp(-1, 1).add(1).div(2)


class Evaluator:
    """One metric family: ``reset`` starts an evaluation, ``update`` takes each batch (images and
    reconstructions in [-1, 1], codes ``(B, N, G)``), ``compute`` reduces over ranks and returns
    floats. Every rank calls ``compute`` (and ``save``) at the same point."""

    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def save(self, folder: Path, prefix: str = "") -> list[Path]:
        """Write this evaluation's artifacts under ``folder`` (rank 0) and return their paths.
        A collective like ``compute``: every rank calls it."""
        return []


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair of [0, 1] images (Wang et al. 2004): Gaussian window (sigma 1.5, 11 taps),
    constants (0.01, 0.03) x data range 1, population (co)variances, averaged over channels and
    the positions where the whole window lies inside the image. This is
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)``; written out because torchmetrics averages over
    reflect-padded borders as well, and importing it costs seconds per process."""
    taps = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=x.device) - SSIM_WINDOW // 2
    gauss = torch.exp(-(taps**2) / (2 * 1.5**2))
    gauss = gauss / gauss.sum()
    channels = x.shape[1]
    rows, cols = gauss.view(1, 1, -1, 1).expand(channels, 1, -1, 1), gauss.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

    def window_mean(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(z, rows, groups=channels), cols, groups=channels)

    x, y = x.double(), y.double()
    mu_x, mu_y = window_mean(x), window_mean(y)
    var_x = window_mean(x * x) - mu_x**2
    var_y = window_mean(y * y) - mu_y**2
    cov = window_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.flatten(1).mean(1)


class ReconstructionMetrics(Evaluator):
    """Per-image pixel metrics on [0, 1] images, averaged over the evaluation set.

    l1   mean |x - y|                      (0 is perfect, at most 1)
    mse  mean (x - y)^2                    (0 is perfect, at most 1)
    psnr 10 log10(1 / mse) per image, dB   (higher is better; an exact image counts as 100 dB)
    ssim structural similarity, data range 1 (at most 1, which is perfect; images of at least
         11 x 11 pixels, the window; smaller images report no ssim)
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        # l1, mse, psnr, ssim, images, images with ssim
        self.sums = torch.zeros(6, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        x, y = to_unit(images), to_unit(reconstructions)
        diff = (x - y).flatten(1).double()
        mse = diff.square().mean(1)
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        ssim, with_ssim = zero, zero
        if min(x.shape[-2:]) >= SSIM_WINDOW:
            ssim, with_ssim = ssim_per_image(x, y).double().sum(), zero + len(x)
        batch = torch.stack([diff.abs().mean(1).sum(), mse.sum(), psnr.sum(), ssim, zero + len(x), with_ssim])
        self.sums += batch.to(self.device)

    def compute(self) -> dict[str, float]:
        l1, mse, psnr, ssim, count, with_ssim = all_reduce_sum(self.sums).tolist()
        if count == 0:
            raise RuntimeError("ReconstructionMetrics.compute() before any update()")
        metrics = {"l1": l1 / count, "mse": mse / count, "psnr": psnr / count}
        if with_ssim:
            metrics["ssim"] = ssim / with_ssim
        return metrics


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
    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor) -> None:
        digits = codes.reshape(-1, len(self.radices)).to(self.device)
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


class PerceptualDistance(Evaluator):
    """LPIPS (Zhang et al. 2018) through the ``lpips`` package, per image on [-1, 1] inputs,
    averaged over the evaluation set: 0 for identical images, higher is more different
    (typically below 1). Reported as ``lpips`` for the AlexNet trunk, ``lpips_<net>`` otherwise,
    so numbers from different trunks never share a name."""

    def __init__(self, network: torch.nn.Module, net: str, device: torch.device):
        self.network = network.to(device)
        self.key = "lpips" if net == "alex" else f"lpips_{net}"
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # distance, images

    @torch.no_grad()
    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        distance = self.network(images.float().clamp(-1, 1), reconstructions.float().clamp(-1, 1)).flatten()
        self.sums += torch.stack([distance.double().sum(), distance.new_tensor(len(distance), dtype=torch.float64)])

    def compute(self) -> dict[str, float]:
        total, count = all_reduce_sum(self.sums).tolist()
        if count == 0:
            raise RuntimeError("PerceptualDistance.compute() before any update()")
        return {self.key: total / count}


class FidelityMetrics(Evaluator):
    """rFID, IS and KID from one set of Inception features (torch-fidelity ``inception-v3-compat``).

    fid      Fréchet distance between the pool features of the originals and of their
             reconstructions (rFID; 0 is identical statistics, unbounded above)
    isc      Inception Score of the reconstructions (1 to 1008, higher is better), ``isc_std``
             its spread over splits
    kid      Kernel Inception Distance between originals and reconstructions (unbiased MMD^2 with
             the cubic polynomial kernel; about 0 when equal, may dip below), ``kid_std``

    The features of every rank are gathered and put in one order (by the originals' pixel
    digests, so sharding cannot change IS splits or KID subsets) and the metrics computed once on
    the whole set. The originals' features are remembered by pixel digest, so later evaluations
    in the same process run Inception on the reconstructions only. The originals' mean and
    covariance are cached under a name hashing their pixels and size (``metrics.fidelity``).
    """

    def __init__(
        self,
        extractor: torch.nn.Module,
        device: torch.device,
        cache_dir: Path | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
    ):
        self.extractor = extractor
        self.device = device
        self.cache_dir = cache_dir
        self.kid_subsets, self.kid_subset_size, self.isc_splits = kid_subsets, kid_subset_size, isc_splits
        self.remembered: dict[bytes, torch.Tensor] = {}  # digest -> pool features of an original (CPU)
        self.reset()

    def reset(self) -> None:
        self.real: list[torch.Tensor] = []
        self.fake: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.digests: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        real, fake = fidelity.to_uint8(images), fidelity.to_uint8(reconstructions)
        self.shape = tuple(real.shape[-2:])
        digests = fidelity.image_digests(real)
        new = [i for i, d in enumerate(digests) if d not in self.remembered]
        if new:
            pool, _ = self.extractor(real[new])
            self.remembered.update(zip([digests[i] for i in new], pool.float().cpu(), strict=True))
        self.real.append(torch.stack([self.remembered[d] for d in digests]).to(self.device))
        pool, logits = self.extractor(fake)
        self.fake.append(pool.float().to(self.device))
        self.logits.append(logits.float().to(self.device))
        table = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), -1)
        self.digests.append(torch.from_numpy(table.copy()).to(self.device))

    def reference_statistics(self, real: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The originals' mean and covariance: from the cache file named by ``key`` if there is one,
        else computed and written there (by rank 0)."""
        path = self.cache_dir / f"{key}.npz" if self.cache_dir is not None else None
        cached = fidelity.load_statistics(path) if path is not None else None
        if cached is not None:
            return cached[0].to(real.device), cached[1].to(real.device)
        mu, sigma = fidelity.statistics(real)
        if path is not None and rank() == 0:
            fidelity.save_statistics(path, mu, sigma, len(real))
        return mu, sigma

    def compute(self) -> dict[str, float]:
        if not self.real:
            raise RuntimeError("FidelityMetrics.compute() before any update()")
        # the statistics stay on the evaluation device (a 2048^2 covariance of 50k images is slow on a CPU)
        real = all_gather_cat(torch.cat(self.real))
        fake = all_gather_cat(torch.cat(self.fake))
        logits = all_gather_cat(torch.cat(self.logits))
        digests = all_gather_cat(torch.cat(self.digests)).cpu().numpy()
        if len(real) < 2:
            raise ValueError(f"FID needs at least 2 images, got {len(real)}")
        order = torch.from_numpy(np.lexsort(digests.T[::-1]).copy()).to(real.device)  # by digest, first byte first
        real, fake, logits = real[order], fake[order], logits[order]
        key = fidelity.reference_key([row.tobytes() for row in digests], *self.shape)
        mu_real, sigma_real = self.reference_statistics(real, key)
        few = len(real) - 1 <= real.shape[1]  # then the centred features are the smaller exact factor
        factor_real = fidelity.feature_factor(real) if few else fidelity.covariance_factor(sigma_real)
        fid = fidelity.frechet_distance(mu_real, factor_real, fake.double().mean(0), fidelity.feature_factor(fake))
        isc, isc_std = fidelity.inception_score(logits, self.isc_splits)
        kid, kid_std = fidelity.kernel_inception_distance(real, fake, self.kid_subsets, self.kid_subset_size)
        return {"fid": fid, "isc": isc, "isc_std": isc_std, "kid": kid, "kid_std": kid_std}


class SlicedWasserstein(Evaluator):
    """Multi-scale sliced Wasserstein distance between originals and reconstructions
    (``metrics.swd``; Karras et al. 2018, appendix D), x 10^3 as in the paper: ``swd_<size>`` per
    Laplacian level (e.g. ``swd_32``, ``swd_16`` for 32 px images) and ``swd``, their mean.
    0 for identical sets, higher is further apart; no pretrained weights needed.

    An original and its reconstruction are sampled at the same ``per_image`` positions, drawn
    from a generator seeded by ``seed`` and the original's pixels: identical sets give exactly 0,
    and the result does not depend on how the images are sharded over ranks or batched. Only the
    first ``max_images`` images (split evenly over ranks) are sampled, which bounds memory on
    large validation sets. The global random state is left alone.
    """

    def __init__(self, device: torch.device, max_images: int = 8192, per_image: int = 128, seed: int = 0):
        self.device, self.max_images, self.per_image, self.seed = device, max_images, per_image, seed
        self.reset()

    def reset(self) -> None:
        self.sizes: list[int] = []
        self.real: list[list[torch.Tensor]] = []
        self.fake: list[list[torch.Tensor]] = []
        self.taken = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        quota = math.ceil(self.max_images / world_size()) - self.taken
        if quota <= 0:
            return
        real, fake = fidelity.to_uint8(images[:quota]), fidelity.to_uint8(reconstructions[:quota])
        rngs = [
            np.random.default_rng([self.seed, *np.frombuffer(digest, dtype=np.uint32).tolist()])
            for digest in fidelity.image_digests(real)
        ]
        if not self.sizes:
            self.sizes = swd_lib.resolutions(min(real.shape[-2:]))
            self.real, self.fake = [[] for _ in self.sizes], [[] for _ in self.sizes]
        levels = len(self.sizes)
        pyramids = zip(
            swd_lib.laplacian_pyramid(real.double(), levels),
            swd_lib.laplacian_pyramid(fake.double(), levels),
            strict=True,
        )
        for level, (r, f) in enumerate(pyramids):
            positions = torch.stack([swd_lib.sample_positions(*r.shape[-2:], self.per_image, rng) for rng in rngs])
            self.real[level].append(swd_lib.descriptors(r, positions).to(self.device, torch.float32))
            self.fake[level].append(swd_lib.descriptors(f, positions).to(self.device, torch.float32))
        self.taken += len(real)

    def compute(self) -> dict[str, float]:
        if not self.sizes:
            raise RuntimeError("SlicedWasserstein.compute() before any update()")
        generator = torch.Generator().manual_seed(self.seed)  # the same directions on every rank
        metrics = {
            f"swd_{size}": swd_lib.swd(all_gather_cat(torch.cat(real)), all_gather_cat(torch.cat(fake)), generator)
            for size, real, fake in zip(self.sizes, self.real, self.fake, strict=True)
        }
        return metrics | {"swd": sum(metrics.values()) / len(metrics)}


class Suite(Evaluator):
    """The evaluators of one evaluation, run as one; ``missing`` maps each metric left out because
    its pretrained weights are missing to the error naming the file (reported, never a number)."""

    def __init__(self, evaluators: dict[str, Evaluator], missing: dict[str, str]):
        self.evaluators, self.missing = evaluators, missing

    def reset(self) -> None:
        for evaluator in self.evaluators.values():
            evaluator.reset()

    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, codes: torch.Tensor) -> None:
        for evaluator in self.evaluators.values():
            evaluator.update(images, reconstructions, codes)

    def compute(self) -> dict[str, float]:
        return {k: v for evaluator in self.evaluators.values() for k, v in evaluator.compute().items()}

    def save(self, folder: Path, prefix: str = "") -> list[Path]:
        return [path for evaluator in self.evaluators.values() for path in evaluator.save(folder, prefix)]


@registry.register("reconstruction")
def _reconstruction(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    return ReconstructionMetrics(device)


@registry.register("codebook")
def _codebook(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    return CodebookMetrics(radices, device)


@registry.register("lpips")
def _lpips(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    from vqlab.perceptual import TRUNKS, build_lpips

    weights.resolve(TRUNKS[options.lpips_net], options.lpips_weights, setting="eval.lpips_weights")
    return PerceptualDistance(build_lpips(options.lpips_net, options.lpips_weights), options.lpips_net, device)


@registry.register("fid")
def _fid(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    path = weights.resolve("inception", options.inception_weights, setting="eval.inception_weights")
    cache = Path(options.reference_cache) if options.reference_cache else fidelity.default_cache_dir()
    return FidelityMetrics(fidelity.build_inception(path, device), device, cache)


@registry.register("swd")
def _swd(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    return SlicedWasserstein(device)


def build(
    names: tuple[str, ...], radices: tuple[int, ...], device: torch.device, options: EvalConfig | None = None
) -> Suite:
    """The named evaluators. A continuous quantizer (no radices) has no codebook to measure. A
    metric whose pretrained weights are missing (on any rank) is left out with a warning naming
    the file, or raises ``MissingWeightsError`` when ``options.missing_weights == "error"``."""
    options = options or EvalConfig()
    built: dict[str, Evaluator] = {}
    missing: dict[str, str] = {}
    for name in names:
        if name == "codebook" and not radices:
            continue
        try:
            built[name] = registry.get(name).builder(radices=radices, device=device, options=options)
        except weights.MissingWeightsError as err:
            missing[name] = str(err)
    # every rank must run the same evaluators, or their collectives would not pair up
    for elsewhere in all_gather_objects(missing):
        for name, message in elsewhere.items():
            missing.setdefault(name, message)
            built.pop(name, None)
    if missing and options.missing_weights == "error":
        raise weights.MissingWeightsError("; ".join(missing.values()))
    for name, message in missing.items():
        warnings.warn(f"metric {name!r} skipped (eval.missing_weights=skip): {message}", stacklevel=2)
    return Suite(built, missing)


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
