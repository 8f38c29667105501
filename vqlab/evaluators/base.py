"""The evaluator contract, the suite that runs several as one, and ``build`` by registered name.

Each metric family lives in its own module of this package and registers its builder here under
the name used in ``eval.metrics``; see the package docstring for the list.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from vqlab import weights
from vqlab.distributed import all_gather_objects
from vqlab.evalconfig import EvalConfig
from vqlab.models import AutoencoderOutput
from vqlab.registry import Registry

registry = Registry("evaluator")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in fp32, clamped."""
    return images.float().clamp(-1, 1).add(1).div(2)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255], clamped and rounded: what saving the image as a PNG would give."""
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def image_digests(images: torch.Tensor) -> list[bytes]:
    """A 16-byte digest of each uint8 image's shape and pixels."""
    host = images.cpu().contiguous().numpy()
    return [hashlib.blake2b(f"{image.shape}".encode() + image.tobytes(), digest_size=16).digest() for image in host]


class Evaluator:
    """One metric family: ``reset`` starts an evaluation, ``update`` takes each batch (images in
    [-1, 1] and the model's whole output for them: ``out.reconstruction``, ``out.quant.codes``
    ``(B, N, G)``, ``out.latents`` ``(B, N, D)``, so a family may measure codes or latents as well
    as pixels), ``compute`` reduces over ranks and returns floats. Every rank calls ``compute``
    (and ``save``) at the same point."""

    def update(self, images: torch.Tensor, out: AutoencoderOutput) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def save(self, folder: Path, prefix: str = "") -> list[Path]:
        """Write this evaluation's artifacts under ``folder`` (rank 0) and return their paths.
        A collective like ``compute``: every rank calls it."""
        return []


class PairEvaluator(Evaluator):
    """A family that compares images with reconstructions and needs nothing else of the model:
    ``update_pairs`` takes any reconstructions, e.g. a baseline codec's, which has no model output."""

    def update(self, images: torch.Tensor, out: AutoencoderOutput) -> None:
        self.update_pairs(images, out.reconstruction)

    def update_pairs(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        raise NotImplementedError


class Suite(Evaluator):
    """The evaluators of one evaluation, run as one; ``missing`` maps each metric left out because
    its pretrained weights are missing to the error naming the file (reported, never a number)."""

    def __init__(self, evaluators: dict[str, Evaluator], missing: dict[str, str]):
        self.evaluators, self.missing = evaluators, missing

    def reset(self) -> None:
        for evaluator in self.evaluators.values():
            evaluator.reset()

    def update(self, images: torch.Tensor, out: AutoencoderOutput) -> None:
        for evaluator in self.evaluators.values():
            evaluator.update(images, out)

    def compute(self) -> dict[str, float]:
        return {k: v for evaluator in self.evaluators.values() for k, v in evaluator.compute().items()}

    def save(self, folder: Path, prefix: str = "") -> list[Path]:
        return [path for evaluator in self.evaluators.values() for path in evaluator.save(folder, prefix)]


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
