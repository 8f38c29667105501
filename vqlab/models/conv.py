"""The upstream convolutional backbone ("conv"): three stride-2 4x4 convolutions with ReLU and a
1x1 projection, and its mirror with transposed convolutions (downsampling factor 8)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vqlab.models.base import Backbone, BackboneConfig, registry
from vqlab.schema import require


@dataclass(frozen=True)
class ConvConfig(BackboneConfig):
    name: str = "conv"
    width: int = 128
    channels: int = 128  # output of the 1x1 conv, before the projection to the quantizer width

    def __post_init__(self):
        require(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        require(self.channels >= 1, "channels", f"must be >= 1, got {self.channels}")

    @property
    def downsample(self) -> int:
        return 8


@registry.register("conv", ConvConfig)
def build_conv(cfg: ConvConfig, in_channels: int = 3) -> Backbone:
    w = cfg.width
    encoder = nn.Sequential(
        nn.Conv2d(in_channels, w, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, w, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, w, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, cfg.channels, 1),
    )
    decoder = nn.Sequential(
        nn.Conv2d(cfg.channels, w, 1),
        nn.ReLU(),
        nn.ConvTranspose2d(w, w, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(w, w, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(w, in_channels, 4, stride=2, padding=1),
    )
    return Backbone(encoder=encoder, decoder=decoder, channels=cfg.channels, downsample=cfg.downsample)
