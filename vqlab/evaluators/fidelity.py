"""Inception features for rFID, IS and KID, the Fréchet distance, and the cache of the originals' features.

Features come from torch-fidelity's ``inception-v3-compat`` extractor (the TensorFlow Inception of
the original FID code, ported bit-exactly), loaded from a file on disk so nothing is downloaded.
IS and KID are torch-fidelity's own functions; the Fréchet distance is computed here in an exact
form that avoids the non-symmetric 2048 x 2048 eigendecomposition torch-fidelity uses (tens of
seconds on a CPU) and agrees with it to rounding (tests/test_evaluators.py checks this).

The originals' pool features are cached on disk by image digest (``FeatureStore``), in one file
per Inception weights file (named by its sha256): a later process evaluating the same originals
runs Inception on the reconstructions only (about 0.3 s per image on one CPU core), and other
weights never see another file's features. The originals' mean and covariance factor are
recomputed from the features each time: they are cheap beside Inception (no eigendecomposition
up to 2048 images, one 2048 x 2048 ``eigh``, a few seconds on a CPU, beyond).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from vqlab import weights
from vqlab.distributed import all_gather_cat, rank
from vqlab.evalconfig import EvalConfig
from vqlab.evaluators.base import Evaluator, PairEvaluator, image_digests, registry, to_uint8

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


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of ``(N, D)`` features, as ``np.cov(rowvar=False)``."""
    features = features.double()
    centred = features - features.mean(0)
    return features.mean(0), centred.T @ centred / (len(features) - 1)


class FeatureStore:
    """The originals' Inception pool features on disk, by image digest, for one weights file:
    ``<folder>/inception-v3-compat-<first 16 hex digits of the weights' sha256>.npz`` holding
    ``digests`` (M, 16) uint8 (``image_digests``: each image's shape and pixels) and ``features``
    (M, 2048) float32. Written whole through a temporary file, so a reader never sees a torn file;
    of two processes adding at once the last writer's entries stay, and the other's are recomputed
    next time (never wrong)."""

    def __init__(self, folder: Path, weights_file: Path):
        self.path = Path(folder) / f"{EXTRACTOR}-{weights.sha256(weights_file)[:16]}.npz"
        self.features: dict[bytes, torch.Tensor] = {}  # what the file holds
        if self.path.is_file():
            with np.load(self.path) as stored:
                rows = (row.tobytes() for row in stored["digests"])
                self.features = dict(zip(rows, torch.from_numpy(stored["features"]), strict=True))

    def add(self, digests: list[bytes], features: torch.Tensor) -> None:
        """Write the features of the images the file does not hold yet."""
        new = [i for i, digest in enumerate(digests) if digest not in self.features]
        if not new:
            return
        self.features.update(zip([digests[i] for i in new], features[new].float().cpu(), strict=True))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        table = np.frombuffer(b"".join(self.features), dtype=np.uint8).reshape(len(self.features), -1)
        with tmp.open("wb") as handle:
            np.savez(handle, digests=table, features=torch.stack(list(self.features.values())).numpy())
        os.replace(tmp, self.path)


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


class FidelityMetrics(PairEvaluator):
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
    in the same process run Inception on the reconstructions only, and kept in ``store`` (rank 0
    writes it), so later processes with the same weights do too.
    """

    def __init__(
        self,
        extractor: torch.nn.Module,
        device: torch.device,
        store: FeatureStore | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
    ):
        self.extractor = extractor
        self.device = device
        self.store = store
        self.kid_subsets, self.kid_subset_size, self.isc_splits = kid_subsets, kid_subset_size, isc_splits
        # digest -> pool features of an original (CPU)
        self.remembered: dict[bytes, torch.Tensor] = dict(store.features) if store is not None else {}
        self.reset()

    def reset(self) -> None:
        self.real: list[torch.Tensor] = []
        self.fake: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.digests: list[torch.Tensor] = []

    @torch.no_grad()
    def update_pairs(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        real, fake = to_uint8(images), to_uint8(reconstructions)
        digests = image_digests(real)
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
        real, fake, logits, digests = real[order], fake[order], logits[order], digests[order.cpu().numpy()]
        if self.store is not None and rank() == 0:
            self.store.add([row.tobytes() for row in digests], real)
        fid = frechet_distance(real.double().mean(0), feature_factor(real), fake.double().mean(0), feature_factor(fake))
        isc, isc_std = inception_score(logits, self.isc_splits)
        kid, kid_std = kernel_inception_distance(real, fake, self.kid_subsets, self.kid_subset_size)
        return {"fid": fid, "isc": isc, "isc_std": isc_std, "kid": kid, "kid_std": kid_std}


@registry.register("fid")
def _fid(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    path = weights.resolve("inception", options.inception_weights, setting="eval.inception_weights")
    folder = Path(options.reference_cache) if options.reference_cache else default_cache_dir()
    return FidelityMetrics(build_inception(path, device), device, FeatureStore(folder, path))
