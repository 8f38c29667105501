"""Pretrained weights vqlab reads, and where it expects them. Nothing is downloaded at run time.

Each entry maps a network to the file name torch hub uses, so a populated hub cache
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``) just works.
A missing file is a ``MissingWeightsError`` that names the exact path and where the file comes from.
``check`` also compares a file's sha256 with the prefix torch hub names carry; that reads the whole
file (about a second for vgg16's 528 MB), so ``python -m vqlab.doctor`` does it, not every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vqlab.errors import MissingFileError


class MissingWeightsError(MissingFileError):
    pass


@dataclass(frozen=True)
class Weights:
    name: str
    filename: str
    url: str
    used_by: str


REGISTRY = {
    w.name: w
    for w in (
        Weights(
            "alexnet",
            "alexnet-owt-7be5be79.pth",
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            "LPIPS (alex)",
        ),
        Weights("vgg16", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", "LPIPS (vgg)"),
        Weights(
            "squeezenet1_1",
            "squeezenet1_1-b8a52dc0.pth",
            "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
            "LPIPS (squeeze)",
        ),
        Weights(
            "inception",
            "weights-inception-2015-12-05-6726825d.pth",
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
            "FID / IS / KID (torch-fidelity inception-v3-compat)",
        ),
    )
}


def sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes (about 0.25 s per 100 MB on one CPU core)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def hub_checkpoints() -> Path:
    """The torch hub cache folder, honouring ``$TORCH_HOME``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def expected_path(name: str, explicit: str = "") -> Path:
    return Path(explicit) if explicit else hub_checkpoints() / REGISTRY[name].filename


def resolve(name: str, explicit: str = "", setting: str = "") -> Path:
    """The file holding ``name``'s weights: ``explicit`` if given, else the hub cache; raises
    ``MissingWeightsError`` naming the path when it is absent (and ``setting``, the config key
    that takes an explicit file, when the caller has one)."""
    path = expected_path(name, explicit)
    if not path.is_file():
        entry = REGISTRY[name]
        where = f"set {setting} to the file" if setting else "point the config at the file"
        raise MissingWeightsError(
            f"{entry.used_by} needs the {name} weights at {path}, which does not exist. "
            f"Copy {entry.filename} (from {entry.url}) there, or {where}; "
            f"vqlab never downloads at run time (python -m vqlab.doctor lists every file)."
        )
    return path


def check(path: Path) -> str | None:
    """What is wrong with the weights file ``path``, or None: ``"missing"``, or a sha256 that does
    not start with the hex a torch hub file name carries before its extension
    (``alexnet-owt-7be5be79.pth``: ``7be5be79``; ``torch.hub.HASH_REGEX``, what torch hub checks on
    download). A file whose name carries none is only checked to exist."""
    if not path.is_file():
        return "missing"
    named = torch.hub.HASH_REGEX.search(path.name)
    prefix = named.group(1) if named else ""
    if not prefix:
        return None
    digest = sha256(path)
    if not digest.startswith(prefix):
        return f"its sha256 starts {digest[: len(prefix)]}, its name says {prefix}: another or damaged file"
    return None


def status() -> list[tuple[Weights, Path, str | None]]:
    """Every registered weight with its expected path and what is wrong with it (``check``)."""
    return [(w, expected_path(w.name), check(expected_path(w.name))) for w in REGISTRY.values()]


def write_stand_in(name: str, path: Path, seed: int = 0) -> Path:
    """Random weights with ``name``'s real architecture (so they cost what the real ones cost, and
    load where they load) at ``path``: for tests and benchmarks on machines without the real files.
    Inception's convolutions are He-initialised, which keeps its activations O(1) (PyTorch's
    default init shrinks them into slow float denormals), and its classifier is scaled up so that
    its logits spread (an Inception Score that is not trivially 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if name == "inception":
        from unittest import mock

        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # the constructor loads a weights file; a stand-in is made without one
        with (
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}),
        ):
            net = FeatureExtractorInceptionV3(
                "stand-in", ["2048", "logits_unbiased"], feature_extractor_weights_path="-"
            )
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        net.fc.weight.data *= 1000
        torch.save(net.state_dict(), path)
        return path
    import torchvision

    torch.save(getattr(torchvision.models, REGISTRY[name].name)().state_dict(), path)
    return path


def stand_in_cache(folder: Path, names: list[str]) -> list[str]:
    """For benchmarks on machines without some of ``names``' files: when the hub cache lacks any,
    a torch hub cache under ``folder`` with links to the files there are and stand-ins
    (``write_stand_in``) for the others is made ``$TORCH_HOME`` (the real cache is never written
    to). Returns the names given stand-ins."""
    import os

    missing = [name for name in names if check(expected_path(name)) == "missing"]
    if not missing:
        return []
    checkpoints = folder / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in names:
        if name not in missing:
            (checkpoints / REGISTRY[name].filename).symlink_to(expected_path(name))
    os.environ["TORCH_HOME"] = str(folder)
    for name in missing:
        write_stand_in(name, checkpoints / REGISTRY[name].filename)
    return missing
