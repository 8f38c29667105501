"""The VQGAN backbone ("resnet") of Esser et al., "Taming Transformers for High-Resolution Image
Synthesis" (arXiv 2012.09841): a 3x3 conv in, stages of residual blocks (GroupNorm, SiLU, 3x3 conv)
with a stride-2 conv between stages, a middle of block / self-attention / block at the lowest
resolution, and the mirror decoder with nearest-neighbour upsampling.

The downsampling factor is ``2^(len(multipliers) - 1)`` unless ``factor`` asks for less; an image
of side H gives ``(H / factor)^2`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.models.base import Backbone, BackboneConfig, registry
from vqlab.schema import require


@dataclass(frozen=True)
class ResNetConfig(BackboneConfig):
    name: str = "resnet"
    width: int = 32  # channels of the first stage; stage i has width * multipliers[i]
    multipliers: tuple[int, ...] = (1, 2, 2, 2)
    blocks: int = 1  # residual blocks per stage, in the encoder and again in the decoder
    attention: bool = True  # single-head self-attention in the middle, at the lowest resolution
    groups: int = 8  # GroupNorm groups; every stage width must be divisible by it
    channels: int = 64  # encoder output, before the projection to the quantizer width
    factor: int = 0  # downsampling factor; 0 = 2^(stages - 1), a smaller power of two skips the last ones

    def __post_init__(self):
        require(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        require(
            len(self.multipliers) >= 1 and all(m >= 1 for m in self.multipliers),
            "multipliers",
            f"must be one or more integers >= 1, got {list(self.multipliers)}",
        )
        require(self.blocks >= 1, "blocks", f"must be >= 1, got {self.blocks}")
        require(self.groups >= 1, "groups", f"must be >= 1, got {self.groups}")
        widths = [self.width * m for m in self.multipliers]
        require(
            all(w % self.groups == 0 for w in widths),
            "groups",
            f"{self.groups} does not divide every stage width {widths} (width x multipliers)",
        )
        require(self.channels >= 1, "channels", f"must be >= 1, got {self.channels}")
        most = 2 ** (len(self.multipliers) - 1)
        require(
            self.factor == 0 or (self.factor & (self.factor - 1) == 0 and 1 <= self.factor <= most),
            "factor",
            f"must be 0 or a power of two up to {most} (2^(stages - 1)), got {self.factor}",
        )

    @property
    def downsample(self) -> int:
        return self.factor or 2 ** (len(self.multipliers) - 1)


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.branch = nn.Sequential(
            norm(in_channels, groups),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            norm(out_channels, groups),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # Zero-init: every block starts as the identity, so the residual stream keeps the input's
        # scale however deep the stack is, and bf16 activations stay far from overflow early on.
        nn.init.zeros_(self.branch[-1].weight)
        nn.init.zeros_(self.branch[-1].bias)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.branch(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        # Zero-init for the same reason as ResBlock: the block starts as the identity.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # 3 x (B, h*w, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h*w, C)
        return x + self.proj(out.transpose(1, 2).reshape(batch, channels, h, w))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(channels: int, cfg: ResNetConfig) -> list[nn.Module]:
    attention = [AttentionBlock(channels, cfg.groups)] if cfg.attention else []
    return [ResBlock(channels, channels, cfg.groups), *attention, ResBlock(channels, channels, cfg.groups)]


@registry.register("resnet", ResNetConfig)
def build_resnet(cfg: ResNetConfig, in_channels: int = 3) -> Backbone:
    widths = [cfg.width * m for m in cfg.multipliers]
    halvings = cfg.downsample.bit_length() - 1  # a factor below 2^(stages - 1) keeps the deepest stages' size

    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
    current = widths[0]
    for i, w in enumerate(widths):
        for _ in range(cfg.blocks):
            layers.append(ResBlock(current, w, cfg.groups))
            current = w
        if i < halvings:
            layers.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
    layers += [
        *middle(current, cfg),
        norm(current, cfg.groups),
        nn.SiLU(),
        nn.Conv2d(current, cfg.channels, 3, padding=1),
    ]
    encoder = nn.Sequential(*layers)

    layers = [nn.Conv2d(cfg.channels, widths[-1], 3, padding=1), *middle(widths[-1], cfg)]
    current = widths[-1]
    for i in reversed(range(len(widths))):
        for _ in range(cfg.blocks):
            layers.append(ResBlock(current, widths[i], cfg.groups))
            current = widths[i]
        if 0 < i <= halvings:
            layers.append(Upsample(current))
    layers += [norm(current, cfg.groups), nn.SiLU(), nn.Conv2d(current, in_channels, 3, padding=1)]
    decoder = nn.Sequential(*layers)
    return Backbone(encoder=encoder, decoder=decoder, channels=cfg.channels, downsample=cfg.downsample)
