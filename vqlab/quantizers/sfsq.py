"""Simple FSQ ("sfsq"): FSQ on [0, 1] with a sigmoid bound.

The variant of Finite Scalar Quantization (Mentzer et al., 2023, https://arxiv.org/abs/2309.15505)
that the seed study called "simple FSQ": ``round(sigmoid(z) * (L - 1)) / (L - 1)`` with a
straight-through gradient. Every level count, odd or even, gets a grid that includes both ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry, straight_through
from vqlab.schema import require


@dataclass(frozen=True)
class SFSQConfig(QuantizerConfig):
    name: str = "sfsq"
    levels: tuple[int, ...] = (8, 5, 5, 5)

    def __post_init__(self):
        require(len(self.levels) > 0, "levels", "needs at least one level")
        require(all(level >= 2 for level in self.levels), "levels", f"each level must be >= 2, got {self.levels}")


@registry.register("sfsq", SFSQConfig)
class SFSQ(Quantizer):
    def __init__(self, cfg: SFSQConfig):
        super().__init__()
        self.cfg = cfg
        self.radices = tuple(cfg.levels)
        self.dim = len(cfg.levels)
        self.register_buffer("steps", torch.tensor(cfg.levels, dtype=torch.float32) - 1, persistent=False)

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        scaled = torch.sigmoid(z) * self.steps  # (B, N, D) in (0, L - 1)
        rounded = straight_through(scaled, scaled.round())  # (B, N, D) integers
        return QuantizerOutput(z_q=rounded / self.steps, codes=rounded.detach().long())

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(z) * self.steps).round().long()

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() / self.steps
