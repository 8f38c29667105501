"""Finite Scalar Quantization: VQ-VAE Made Simple (Mentzer et al., 2023).
https://arxiv.org/abs/2309.15505

Each of the d channels is bounded with tanh to (L_i - 1)/2 half-width (shifted by 1/2 for even
L_i), rounded with a straight-through gradient and rescaled to [-1, 1]. The implicit codebook is
the product of the per-channel grids, so ``radices == levels``. The bound follows the paper's
Appendix A.1 literally, including its ``shift = tan(offset / half_l)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry, straight_through
from vqlab.schema import require


@dataclass(frozen=True)
class FSQConfig(QuantizerConfig):
    name: str = "fsq"
    levels: tuple[int, ...] = (8, 5, 5, 5)
    eps: float = 1e-3

    def __post_init__(self):
        require(len(self.levels) > 0, "levels", "needs at least one level")
        require(all(level >= 2 for level in self.levels), "levels", f"each level must be >= 2, got {self.levels}")
        # eps shrinks the bound by (L - 1) * eps / 2 on each side, eating into the outermost levels'
        # half-wide rounding intervals; at 1 / (L - 1) they vanish. Capping it at half of that
        # leaves them at least half their width at eps = 0, so every level stays reachable.
        largest = 1 / (2 * (max(self.levels) - 1))
        require(
            0.0 <= self.eps <= largest,
            "eps",
            f"must be in [0, 1 / (2 (max(levels) - 1))] = [0, {largest:.4g}] for levels {self.levels}, "
            f"or the outermost levels become unreachable; got {self.eps}",
        )


@registry.register("fsq", FSQConfig)
class FSQ(Quantizer):
    def __init__(self, cfg: FSQConfig):
        super().__init__()
        self.cfg = cfg
        self.radices = tuple(cfg.levels)
        self.dim = len(cfg.levels)
        levels = torch.tensor(cfg.levels, dtype=torch.float32)
        half_l = (levels - 1) * (1 - cfg.eps) / 2
        offset = torch.where(levels % 2 == 1, 0.0, 0.5)
        self.register_buffer("half_l", half_l, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("shift", torch.tan(offset / half_l), persistent=False)
        self.register_buffer("half_width", torch.div(levels, 2, rounding_mode="floor"), persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z + self.shift) * self.half_l - self.offset

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        return self.bound(z.float()) / self.half_width  # z_q before rounding: z_q = round(relaxed · w) / w

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        bounded = self.bound(z)  # (B, N, D) in (-L/2, L/2)
        rounded = straight_through(bounded, bounded.round())  # (B, N, D) integers
        codes = (rounded.detach() + self.half_width).long()  # (B, N, D) digits in [0, L)
        return QuantizerOutput(z_q=rounded / self.half_width, codes=codes)

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        return (self.bound(z).round() + self.half_width).long()

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.float() - self.half_width) / self.half_width
