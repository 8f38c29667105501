"""The backbone contract: an encoder/decoder pair registered by name with its own config."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vqlab.registry import Registry

registry = Registry("backbone")


@dataclass(frozen=True)
class BackboneConfig:
    """Base of every backbone's own config; ``name`` selects the registered backbone."""

    name: str = "conv"

    @classmethod
    def variant(cls, name: str) -> type[BackboneConfig]:
        return registry.get(name).config_cls

    @property
    def downsample(self) -> int:
        """Spatial reduction factor from image to token grid."""
        raise NotImplementedError

    def tokens(self, image_size: int) -> int:
        """Tokens per square image of side ``image_size``."""
        return (image_size // self.downsample) ** 2


@dataclass
class Backbone:
    """``encoder``: (B, C, H, W) -> (B, channels, H/f, W/f); ``decoder`` the inverse map."""

    encoder: nn.Module
    decoder: nn.Module
    channels: int
    downsample: int
