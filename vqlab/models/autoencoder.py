"""VQAutoencoder: images -> encoder -> projection -> quantizer -> projection -> decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vqlab.models.base import Backbone
from vqlab.quantizers import Quantizer, QuantizerOutput


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor  # (B, C, H, W), unbounded; images live in [-1, 1]
    quant: QuantizerOutput
    latents: torch.Tensor  # (B, N, D) the encoder's tokens as fed to the quantizer (before quantization)


class VQAutoencoder(nn.Module):
    """Single-device model; DDP, autocast and compile are the trainer's business."""

    def __init__(self, backbone: Backbone, quantizer: Quantizer):
        super().__init__()
        self.encoder = backbone.encoder
        self.decoder = backbone.decoder
        self.quantizer = quantizer
        self.downsample = backbone.downsample
        self.pre_quant = nn.Linear(backbone.channels, quantizer.dim)
        self.post_quant = nn.Linear(quantizer.dim, backbone.channels)

    def last_layer(self) -> torch.Tensor:
        """The decoder's output-layer weight, where VQGAN's adaptive adversarial weight is measured."""
        return [p for p in self.decoder.parameters() if p.ndim > 1][-1]

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(
                f"images must be (B, C, H, W) with H and W divisible by the backbone's downsampling "
                f"factor {self.downsample}, got {tuple(images.shape)}"
            )

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder features as quantizer-width tokens ``(B, h*w, D)`` and the grid ``(h, w)``."""
        self._check_images(images)
        features = self.encoder(images)  # (B, C', h, w)
        grid = (features.shape[-2], features.shape[-1])
        return self.pre_quant(features.flatten(2).transpose(1, 2)), grid  # (B, h*w, D)

    def detokenize(self, z_q: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        features = self.post_quant(z_q)  # (B, h*w, C')
        features = features.transpose(1, 2).reshape(z_q.shape[0], -1, *grid)  # (B, C', h, w)
        return self.decoder(features)

    def forward(self, images: torch.Tensor) -> AutoencoderOutput:
        z, grid = self.tokens(images)
        quant = self.quantizer(z)
        return AutoencoderOutput(reconstruction=self.detokenize(quant.z_q, grid), quant=quant, latents=z)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> ``(B, h, w, G)`` int64 codes."""
        z, grid = self.tokens(images)
        return self.quantizer.encode(z).reshape(images.shape[0], *grid, -1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, G)`` codes -> images."""
        batch, h, w, _ = codes.shape
        z_q = self.quantizer.decode(codes.reshape(batch, h * w, -1))
        return self.detokenize(z_q.to(self.post_quant.weight.dtype), (h, w))
