"""Inception features for rFID, IS and KID, the Fréchet distance, and the reference-statistics cache.

Features come from torch-fidelity's ``inception-v3-compat`` extractor (the TensorFlow Inception of
the original FID code, ported bit-exactly), loaded from a file on disk so nothing is downloaded.
IS and KID are torch-fidelity's own functions; the Fréchet distance is computed here in an exact
form that avoids the non-symmetric 2048 x 2048 eigendecomposition torch-fidelity uses (tens of
seconds on a CPU) and agrees with it to rounding (tests/test_evaluators.py checks this).

Reference statistics (mean and covariance of the real images' pool features, torch-fidelity's
``mu``/``sigma`` npz layout) are cached as ``<dir>/inception-v3-compat-<H>x<W>-<hash>.npz``, where
``<hash>`` digests every reference image's pixels: different or changed reference data, or another
image size, gets another file, so stale statistics are never picked up.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

EXTRACTOR = "inception-v3-compat"
POOL, LOGITS = "2048", "logits_unbiased"  # torch-fidelity's layers for FID/KID and for IS


def default_cache_dir() -> Path:
    """``$TORCH_HOME/vqlab/fid_reference``: beside the weights, shared by every run."""
    return Path(torch.hub.get_dir()).parent / "vqlab" / "fid_reference"


def build_inception(weights_file: Path, device: torch.device) -> torch.nn.Module:
    """torch-fidelity's Inception from ``weights_file``; takes uint8 ``(B, 3, H, W)`` images and
    returns ``(pool features (B, 2048), unbiased logits (B, 1008))``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3(EXTRACTOR, [POOL, LOGITS], feature_extractor_weights_path=str(weights_file))
    return net.to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255], clamped and rounded: what saving the image as a PNG would give."""
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def image_digests(images: torch.Tensor) -> list[bytes]:
    """A 16-byte digest of each uint8 image's shape and pixels."""
    host = images.cpu().contiguous().numpy()
    return [hashlib.blake2b(f"{image.shape}".encode() + image.tobytes(), digest_size=16).digest() for image in host]


def reference_key(digests: list[bytes], height: int, width: int) -> str:
    """The cache name of a reference set: order-free (sharding must not change it), with its size."""
    content = hashlib.sha256(b"".join(sorted(digests))).hexdigest()[:16]
    return f"{EXTRACTOR}-{height}x{width}-{content}"


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of ``(N, D)`` features, as ``np.cov(rowvar=False)``."""
    features = features.double()
    centred = features - features.mean(0)
    return features.mean(0), centred.T @ centred / (len(features) - 1)


def load_statistics(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    with np.load(path) as stats:
        return torch.from_numpy(stats["mu"]), torch.from_numpy(stats["sigma"])


def save_statistics(path: Path, mu: torch.Tensor, sigma: torch.Tensor, count: int) -> None:
    """Written through a temporary file, so a reader never sees a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        np.savez(handle, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), count=count)
    os.replace(tmp, path)


def covariance_factor(sigma: torch.Tensor) -> torch.Tensor:
    """``P`` with ``P.T @ P == sigma`` (the symmetric square root; negative rounding clipped)."""
    values, vectors = torch.linalg.eigh(sigma.double())
    return values.clamp_min(0).sqrt()[:, None] * vectors.T


def feature_factor(features: torch.Tensor) -> torch.Tensor:
    """``P`` with ``P.T @ P`` the covariance of ``features``: the centred features themselves when
    there are no more samples than dimensions (exact and small), else the covariance's root."""
    features = features.double()
    if len(features) - 1 <= features.shape[1]:
        return (features - features.mean(0)) / (len(features) - 1) ** 0.5
    return covariance_factor(statistics(features)[1])


def frechet_distance(mu1: torch.Tensor, factor1: torch.Tensor, mu2: torch.Tensor, factor2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)`` for ``S = P.T @ P``.

    ``tr sqrt(S1 S2)`` is the nuclear norm of ``P1 @ P2.T``: ``S1 S2`` has the eigenvalues of
    ``P1 P2.T P2 P1.T = (P1 P2.T)(P1 P2.T).T``, the squared singular values of ``P1 P2.T``.
    """
    factor1, factor2 = factor1.double(), factor2.double()
    mean_term = (mu1.double() - mu2.double()).square().sum()
    trace_sqrt = torch.linalg.svdvals(factor1 @ factor2.T).sum()
    return (mean_term + factor1.square().sum() + factor2.square().sum() - 2 * trace_sqrt).item()


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """torch-fidelity's IS (mean, std over ``splits``); fewer splits below 20 images, so that no
    split holds fewer than 2."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits.cpu(), splits=max(min(splits, len(logits) // 2), 1))
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000
) -> tuple[float, float]:
    """torch-fidelity's KID (polynomial kernel; mean, std over subsets), subsets no larger than the sets."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(real), len(fake))
    out = kid_features_to_metric(real.cpu(), fake.cpu(), kid_subsets=subsets, kid_subset_size=size, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]
