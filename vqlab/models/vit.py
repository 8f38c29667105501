"""The ViT backbone ("vit") of ViT-VQGAN, Yu et al., "Vector-quantized Image Modeling with Improved
VQGAN" (arXiv 2110.04627), built from the Vision Transformer of Dosovitskiy et al. (arXiv
2010.11929): non-overlapping patches embedded linearly, a 2-D sin-cos or learned position
embedding, pre-norm transformer blocks (attention, MLP) and a final LayerNorm; the decoder adds
positions to the token grid, runs its own blocks and maps each token back to a patch of pixels.
The projection to the quantizer width is VQAutoencoder's.

``attention: linear`` swaps softmax attention for linear attention (vqlab.models.attention) and
keeps everything else. The downsampling factor is the patch size; an image of side H gives
``(H / patch_size)^2`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.models.attention import Attention
from vqlab.models.base import Backbone, BackboneConfig, registry
from vqlab.schema import require


@dataclass(frozen=True)
class ViTConfig(BackboneConfig):
    name: str = "vit"
    patch_size: int = 8
    width: int = 128
    depth: int = 4  # transformer blocks in the encoder and again in the decoder
    heads: int = 4
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * width
    attention: Literal["softmax", "linear"] = "softmax"
    position: Literal["sincos", "learned"] = "sincos"
    image_size: int = 0  # learned positions only: the (square) image side their table is made for

    def __post_init__(self):
        require(self.patch_size >= 1, "patch_size", f"must be >= 1, got {self.patch_size}")
        require(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        require(self.heads >= 1, "heads", f"must be >= 1, got {self.heads}")
        require(self.mlp_ratio >= 1, "mlp_ratio", f"must be >= 1, got {self.mlp_ratio}")
        require(
            self.width >= 4 and self.width % self.heads == 0 and self.width % 4 == 0,
            "width",
            f"must be a multiple of heads ({self.heads}) and of 4 (sin and cos for rows and columns), got {self.width}",
        )
        if self.position == "learned":
            require(
                self.image_size >= 1 and self.image_size % self.patch_size == 0,
                "image_size",
                f"position=learned needs the image side, a multiple of patch_size {self.patch_size}; "
                f"got {self.image_size}",
            )
        else:
            require(self.image_size == 0, "image_size", "is only used by position=learned; leave it 0")

    @property
    def downsample(self) -> int:
        return self.patch_size


def sincos_position(h: int, w: int, width: int, device: torch.device) -> torch.Tensor:
    """The 2-D sin-cos embedding ``(h*w, width)``: the first half of the channels encode the row,
    the second half the column, each as sines and cosines of geometric frequencies."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)  # (width/4,)
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freqs  # (h, width/4)
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freqs  # (w, width/4)
    rows = torch.cat([rows.sin(), rows.cos()], dim=-1)[:, None].expand(h, w, 2 * quarter)  # (h, w, width/2)
    cols = torch.cat([cols.sin(), cols.cos()], dim=-1)[None].expand(h, w, 2 * quarter)  # (h, w, width/2)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, width)


class Position(nn.Module):
    """Adds the position embedding of an ``(h, w)`` grid to its tokens ``(B, h*w, D)``; sin-cos is
    computed for the grid at hand, so any image size divisible by the patch size works."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.image_size = cfg.image_size
        self.table = None
        if cfg.position == "learned":
            side = cfg.image_size // cfg.patch_size
            self.table = nn.Parameter(torch.empty(side * side, cfg.width))  # (N, D)
            nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        if self.table is None:
            return x + sincos_position(h, w, x.shape[-1], x.device).to(x.dtype)
        if h * self.patch_size != self.image_size or w * self.patch_size != self.image_size:
            raise ValueError(
                f"the learned position embedding is made for {self.image_size}x{self.image_size} images, got "
                f"{h * self.patch_size}x{w * self.patch_size}; set model.image_size to the data's image size "
                f"or use model.position=sincos"
            )
        return x + self.table.to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width)
        self.attention = Attention(cfg.width, cfg.heads, cfg.attention)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width),
        )
        # Zero-init the branches' output layers: each block starts as the identity, so the residual
        # stream does not grow with depth and bf16 activations and gradients stay in range early on.
        for layer in (self.attention.proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig, in_channels: int):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.position = Position(cfg)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images)  # (B, D, h, w)
        batch, width, h, w = x.shape
        x = self.position(x.flatten(2).transpose(1, 2), (h, w))  # (B, N, D)
        x = self.norm(self.blocks(x))
        return x.transpose(1, 2).reshape(batch, width, h, w)


class ViTDecoder(nn.Module):
    def __init__(self, cfg: ViTConfig, out_channels: int):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.position = Position(cfg)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, out_channels * cfg.patch_size**2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, _, h, w = features.shape  # (B, D, h, w)
        x = self.position(features.flatten(2).transpose(1, 2), (h, w))  # (B, N, D)
        patches = self.head(self.norm(self.blocks(x)))  # (B, N, C*p*p)
        return F.pixel_shuffle(patches.transpose(1, 2).reshape(batch, -1, h, w), self.patch_size)  # (B, C, H, W)


@registry.register("vit", ViTConfig)
def build_vit(cfg: ViTConfig, in_channels: int = 3) -> Backbone:
    return Backbone(
        encoder=ViTEncoder(cfg, in_channels),
        decoder=ViTDecoder(cfg, in_channels),
        channels=cfg.width,
        downsample=cfg.downsample,
    )
