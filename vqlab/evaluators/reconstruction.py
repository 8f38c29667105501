"""Pixel metrics: L1, MSE, PSNR and SSIM on [0, 1] images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vqlab.distributed import all_gather_cat, all_reduce_sum, rank, world_size
from vqlab.evalconfig import EvalConfig
from vqlab.evaluators.base import Evaluator, PairEvaluator, registry, to_unit
from vqlab.runfolder import RunFolder

# skimage's and torchmetrics' Gaussian window: sigma 1.5 truncated at 3.5 sigma.
SSIM_WINDOW = 11


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


class ReconstructionMetrics(PairEvaluator):
    """Per-image pixel metrics on [0, 1] images, averaged over the evaluation set.

    l1   mean |x - y|                      (0 is perfect, at most 1)
    mse  mean (x - y)^2                    (0 is perfect, at most 1)
    psnr 10 log10(1 / mse) per image, dB   (higher is better; an exact image counts as 100 dB)
    ssim structural similarity, data range 1 (at most 1, which is perfect; images of at least
         11 x 11 pixels, the window; smaller images report no ssim)

    ``save`` writes the L1 of every image, ``<prefix>per_image_l1.npy`` (``RunFolder.per_image_l1``):
    a float64 array in dataset order, gathered from every rank (rank ``r`` of ``w`` holds images
    ``r, r + w, ...`` in that order, as ``data.ShardSampler`` deals them to the validation loader),
    whose mean is ``l1``. It pairs two runs' images by index when they were validated on the same
    crops (``vqlab.report``'s bootstrap over crops).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        # l1, mse, psnr, ssim, images, images with ssim
        self.sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        self.l1: list[torch.Tensor] = []  # each batch's per-image L1, in the order the batches came

    @torch.no_grad()
    def update_pairs(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        x, y = to_unit(images), to_unit(reconstructions)
        diff = (x - y).flatten(1).double()
        mse = diff.square().mean(1)
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        ssim, with_ssim = zero, zero
        if min(x.shape[-2:]) >= SSIM_WINDOW:
            ssim, with_ssim = ssim_per_image(x, y).double().sum(), zero + len(x)
        l1 = diff.abs().mean(1)
        batch = torch.stack([l1.sum(), mse.sum(), psnr.sum(), ssim, zero + len(x), with_ssim])
        self.sums += batch.to(self.device)
        self.l1.append(l1.to(self.device))

    def compute(self) -> dict[str, float]:
        l1, mse, psnr, ssim, count, with_ssim = all_reduce_sum(self.sums).tolist()
        if count == 0:
            raise RuntimeError("ReconstructionMetrics.compute() before any update()")
        metrics = {"l1": l1 / count, "mse": mse / count, "psnr": psnr / count}
        if with_ssim:
            metrics["ssim"] = ssim / with_ssim
        return metrics

    def per_image_l1(self) -> torch.Tensor:
        """The L1 of every image of all ranks, in dataset order (a collective: every rank calls it)."""
        local = torch.cat(self.l1) if self.l1 else torch.zeros(0, dtype=torch.float64, device=self.device)
        where = rank() + world_size() * torch.arange(len(local), device=self.device)
        values, indices = all_gather_cat(local), all_gather_cat(where)
        return values[torch.argsort(indices)]

    def save(self, folder: Path, prefix: str = "") -> list[Path]:
        """``<prefix>per_image_l1.npy``: ``per_image_l1`` (rank 0 writes it)."""
        values = self.per_image_l1()
        if rank() != 0:
            return []
        path = RunFolder(folder).per_image_l1(prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, values.cpu().numpy())
        return [path]


@registry.register("reconstruction")
def _reconstruction(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    return ReconstructionMetrics(device)
