"""The upstream convolutional backbone ("conv"): three stride-2 4x4 convolutions with ReLU and a
1x1 projection, and its mirror with transposed convolutions (downsampling factor 8).

``blocks`` adds residual blocks at the latent resolution to both sides, as VQ-VAE's encoder and
decoder have them (Neural Discrete Representation Learning, van den Oord et al., 2017,
https://arxiv.org/abs/1711.00937: ReLU, 3x3 conv, ReLU, 1x1 conv, added to the input). At 1/8 of
the image's side they cost little and let each token's code depend on its neighbours'.
``upsample: nearest`` replaces each 4x4 transposed convolution of the decoder with a nearest-neighbour
doubling and a 3x3 convolution (2.25x its multiply-adds), which has no checkerboard pattern to unlearn
(Odena et al., 2016, https://distill.pub/2016/deconv-checkerboard/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from vqlab.models.base import Backbone, BackboneConfig, registry
from vqlab.schema import require


@dataclass(frozen=True)
class ConvConfig(BackboneConfig):
    name: str = "conv"
    width: int = 128
    channels: int = 128  # output of the 1x1 conv, before the projection to the quantizer width
    blocks: int = 0  # residual blocks at the latent resolution, in the encoder and in the decoder
    upsample: Literal["transposed", "nearest"] = "transposed"  # the decoder's doublings

    def __post_init__(self):
        require(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        require(self.channels >= 1, "channels", f"must be >= 1, got {self.channels}")
        require(self.blocks >= 0, "blocks", f"must be >= 0, got {self.blocks}")

    @property
    def downsample(self) -> int:
        return 8


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 1)
        )

    def forward(self, x):
        return x + self.body(x)


def doubling(cfg: ConvConfig, channels_in: int, channels_out: int) -> nn.Module:
    if cfg.upsample == "nearest":
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels_in, channels_out, 3, padding=1)
        )
    return nn.ConvTranspose2d(channels_in, channels_out, 4, stride=2, padding=1)


@registry.register("conv", ConvConfig)
def build_conv(cfg: ConvConfig, in_channels: int = 3) -> Backbone:
    w = cfg.width
    encoder = nn.Sequential(
        nn.Conv2d(in_channels, w, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, w, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, w, 4, stride=2, padding=1),
        *(ResidualBlock(w) for _ in range(cfg.blocks)),
        nn.ReLU(),
        nn.Conv2d(w, cfg.channels, 1),
    )
    decoder = nn.Sequential(
        nn.Conv2d(cfg.channels, w, 1),
        *(ResidualBlock(w) for _ in range(cfg.blocks)),
        nn.ReLU(),
        doubling(cfg, w, w),
        nn.ReLU(),
        doubling(cfg, w, w),
        nn.ReLU(),
        doubling(cfg, w, in_channels),
    )
    return Backbone(encoder=encoder, decoder=decoder, channels=cfg.channels, downsample=cfg.downsample)
