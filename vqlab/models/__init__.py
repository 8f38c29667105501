"""Backbones (one file each, registered by name) and the VQAutoencoder that wraps them."""

from __future__ import annotations

import importlib
import pkgutil

from vqlab.models.autoencoder import AutoencoderOutput, VQAutoencoder
from vqlab.models.base import Backbone, BackboneConfig, registry
from vqlab.quantizers import Quantizer

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in {"base", "autoencoder"} and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def available() -> list[str]:
    return registry.names()


def build_backbone(cfg: BackboneConfig, in_channels: int = 3) -> Backbone:
    return registry.get(cfg.name).builder(cfg, in_channels=in_channels)


def build_autoencoder(cfg: BackboneConfig, quantizer: Quantizer, in_channels: int = 3) -> VQAutoencoder:
    return VQAutoencoder(build_backbone(cfg, in_channels), quantizer)


__all__ = [
    "AutoencoderOutput",
    "Backbone",
    "BackboneConfig",
    "VQAutoencoder",
    "available",
    "build_autoencoder",
    "build_backbone",
    "registry",
]
