"""Multi-scale sliced Wasserstein distance (SWD) on Laplacian-pyramid patches.

Karras et al., "Progressive Growing of GANs", arXiv 1710.10196, appendix D, following their
reference code: a Laplacian pyramid from the full resolution down to 16x16; at each level, 7x7
neighbourhoods (3 x 7 x 7 = 147 numbers) sampled at random positions; each set's descriptors
normalised per colour channel to zero mean and unit standard deviation; the sliced Wasserstein
distance averaged over 4 x 128 random unit directions; reported x 10^3, per level and averaged.

A distribution distance that needs no pretrained weights. Images smaller than 32 px have a single
level (the image itself); 32 px images have two (32 and 16).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vqlab.data import ShardSampler
from vqlab.distributed import all_gather_cat, rank, world_size
from vqlab.evalconfig import EvalConfig
from vqlab.evaluators.base import Evaluator, PairEvaluator, image_digests, registry, to_uint8

# The 5-tap binomial filter of cv2.pyrDown / pyrUp, as in the reference code.
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
NEIGHBOURHOOD = 7
SMALLEST_LEVEL = 16


def resolutions(size: int) -> list[int]:
    """Pyramid level sizes from ``size`` halving down to 16 (at least the image itself)."""
    levels = []
    while size >= SMALLEST_LEVEL or not levels:
        levels.append(size)
        size //= 2
    return levels


def _blur(images: torch.Tensor, gain: float) -> torch.Tensor:
    kernel = (torch.outer(_BINOMIAL, _BINOMIAL) * gain).to(images)
    channels = images.shape[1]
    # torch's "reflect" is scipy.ndimage's "mirror", which the reference code uses
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(padded, kernel.expand(channels, 1, 5, 5), groups=channels)


def pyr_down(images: torch.Tensor) -> torch.Tensor:
    """Blur then keep every other pixel (cv2.pyrDown)."""
    return _blur(images, 1.0)[..., ::2, ::2]


def pyr_up(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Insert zeros between pixels then blur with 4x gain (cv2.pyrUp), cropped to ``size``."""
    batch, channels, height, width = images.shape
    spread = images.new_zeros(batch, channels, 2 * height, 2 * width)
    spread[..., ::2, ::2] = images
    return _blur(spread, 4.0)[..., : size[0], : size[1]]


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, finest first; the last level is the low-pass residual. Computed in the
    dtype of ``images``: float64 keeps the levels independent of how images are batched (float32
    convolutions pick batch-size-dependent algorithms)."""
    pyramid = [images]
    for _ in range(1, levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1], pyramid[-2].shape[-2:])
    return pyramid


def sample_positions(height: int, width: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    """``(count, 2)`` centres (y, x) whose whole neighbourhood lies inside a ``height x width`` image."""
    half = NEIGHBOURHOOD // 2
    ys = rng.integers(half, height - half, count)
    xs = rng.integers(half, width - half, count)
    return torch.from_numpy(np.stack([ys, xs], axis=-1))


def descriptors(level: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The 7x7 neighbourhoods around ``positions`` (batch, per_image, 2) as ``(batch * per_image, C, 7, 7)``."""
    half = NEIGHBOURHOOD // 2
    offsets = torch.arange(-half, half + 1, device=level.device)
    positions = positions.to(level.device)
    ys = positions[..., 0, None, None] + offsets[:, None]  # (B, K, 7, 1)
    xs = positions[..., 1, None, None] + offsets[None, :]  # (B, K, 1, 7)
    batch = torch.arange(level.shape[0], device=level.device)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[batch, ys, xs]  # (B, K, 7, 7, C)
    return patches.flatten(0, 1).permute(0, 3, 1, 2)


def normalise(desc: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation per colour channel over the whole set, flattened."""
    desc = desc - desc.mean(dim=(0, 2, 3), keepdim=True)
    desc = desc / desc.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-12)
    return desc.flatten(1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Mean over the unit ``directions`` (D, K) of the 1-D Wasserstein-1 distance between the
    projections of the equal-sized point sets ``a`` and ``b`` (N, D)."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-sized sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = directions.to(a)
    # sorted along contiguous rows: twice as fast as along dim 0 of (N, K), the same values
    projected_a = torch.sort((a @ directions).T.contiguous(), dim=-1).values
    projected_b = torch.sort((b @ directions).T.contiguous(), dim=-1).values
    return (projected_a - projected_b).abs().mean().item()


def random_directions(dim: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` directions uniform on the unit sphere of R^dim, as columns."""
    directions = torch.randn(dim, count, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=0, keepdim=True)


def swd(
    real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator, repeats: int = 4, per_repeat: int = 128
) -> float:
    """SWD x 10^3 between two descriptor sets of one level, each normalised on its own. In float64:
    in float32 the result moves in the fourth digit with the order of the descriptors (that is,
    with the number of ranks)."""
    real, fake = normalise(real.double()), normalise(fake.double())
    distances = [
        sliced_wasserstein(real, fake, random_directions(real.shape[1], per_repeat, generator)) for _ in range(repeats)
    ]
    return 1e3 * sum(distances) / repeats


class SlicedWasserstein(PairEvaluator):
    """Multi-scale sliced Wasserstein distance between originals and reconstructions
    (Karras et al. 2018, appendix D), x 10^3 as in the paper: ``swd_<size>`` per
    Laplacian level (e.g. ``swd_32``, ``swd_16`` for 32 px images) and ``swd``, their mean.
    0 for identical sets, higher is further apart; no pretrained weights needed.

    An original and its reconstruction are sampled at the same ``per_image`` positions, drawn
    from a generator seeded by ``seed`` and the original's pixels: identical sets give exactly 0,
    and the result does not depend on how the images are sharded over ranks or batched. Only the
    first ``max_images`` images of the whole set are sampled, which bounds memory on large
    validation sets: each rank takes those of them that ``data.ShardSampler`` deals it, assuming
    its batches arrive in that sampler's order (as the validation loader's do), so the selection
    does not depend on the number of ranks. The global random state is left alone.
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
    def update_pairs(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        # the first max_images images of the whole set, on whichever rank holds them
        quota = len(ShardSampler(self.max_images, rank(), world_size())) - self.taken
        if quota <= 0:
            return
        real, fake = to_uint8(images[:quota]), to_uint8(reconstructions[:quota])
        rngs = [
            np.random.default_rng([self.seed, *np.frombuffer(digest, dtype=np.uint32).tolist()])
            for digest in image_digests(real)
        ]
        if not self.sizes:
            self.sizes = resolutions(min(real.shape[-2:]))
            self.real, self.fake = [[] for _ in self.sizes], [[] for _ in self.sizes]
        levels = len(self.sizes)
        pyramids = zip(
            laplacian_pyramid(real.double(), levels),
            laplacian_pyramid(fake.double(), levels),
            strict=True,
        )
        for level, (r, f) in enumerate(pyramids):
            positions = torch.stack([sample_positions(*r.shape[-2:], self.per_image, rng) for rng in rngs])
            self.real[level].append(descriptors(r, positions).to(self.device, torch.float32))
            self.fake[level].append(descriptors(f, positions).to(self.device, torch.float32))
        self.taken += len(real)

    def compute(self) -> dict[str, float]:
        if not self.sizes:
            raise RuntimeError("SlicedWasserstein.compute() before any update()")
        generator = torch.Generator().manual_seed(self.seed)  # the same directions on every rank
        metrics = {
            f"swd_{size}": swd(all_gather_cat(torch.cat(real)), all_gather_cat(torch.cat(fake)), generator)
            for size, real, fake in zip(self.sizes, self.real, self.fake, strict=True)
        }
        return metrics | {"swd": sum(metrics.values()) / len(metrics)}


@registry.register("swd")
def _swd(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    return SlicedWasserstein(device)
