"""One scalar, radix-decomposed ("radix", the study's "FSQ-1"); vqlab's own quantizer.

The counterpart of Finite Scalar Quantization (Mentzer et al., 2023, https://arxiv.org/abs/2309.15505),
which rounds d independent scalars: here a learned projection gives ONE scalar per token, bounded
to [0, M - 1] with ``sigmoid * (M - 1)`` and rounded with a straight-through gradient to an integer
m, with ``M = prod(radices)``. The codes are m's mixed-radix digits over ``radices`` (digit 0 least
significant, the index spec of ``vqlab.codes``), so the integer itself is the flat index and the
study can ask whether a hierarchical decomposition of one integer matches d independent scalars.

``z_q`` is a learned affine line through the width: ``t * w + b`` with ``t = 2 m / (M - 1) - 1`` in
[-1, 1]. It is written as elementwise ops, not a matmul, so that ``decode`` recomputes exactly the
same values from the digits on any leading shape. ``M <= 2**22``: near the top, fp32 sigmoid
outputs are 2**-24 apart, so the scalar moves in steps of (M - 1) / 2**24 <= 1/4 and every integer
is reachable (at 2**23 some 4% of them are skipped, at 2**24 some 12%); m is then exact in fp32 too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vqlab import codes as codes_lib
from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry, straight_through
from vqlab.schema import require

MAX_CODES = 2**22  # the largest M whose every integer the fp32 sigmoid bound reaches


@dataclass(frozen=True)
class RadixConfig(QuantizerConfig):
    name: str = "radix"
    radices: tuple[int, ...] = (32, 32)
    dim: int = 64  # input width, projected to one scalar

    def __post_init__(self):
        require(len(self.radices) > 0, "radices", "needs at least one radix")
        require(all(r >= 2 for r in self.radices), "radices", f"each radix must be >= 2, got {self.radices}")
        require(
            math.prod(self.radices) <= MAX_CODES,
            "radices",
            f"prod(radices) = {math.prod(self.radices)} exceeds 2**22, above which the fp32 sigmoid bound "
            "skips integers (codes that no input reaches)",
        )
        require(self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")


@registry.register("radix", RadixConfig)
class Radix(Quantizer):
    def __init__(self, cfg: RadixConfig):
        super().__init__()
        self.cfg = cfg
        self.radices = tuple(cfg.radices)
        self.dim = cfg.dim
        self.top = float(self.codebook_size - 1)  # M - 1, the largest integer
        self.project = nn.Linear(cfg.dim, 1)
        self.embed = nn.Linear(1, cfg.dim)  # parameters of the line; applied elementwise in embed_integer

    def scalar(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.project(z)) * self.top  # (B, N, 1) in [0, M - 1]

    def embed_integer(self, m: torch.Tensor) -> torch.Tensor:
        t = m / self.top * 2 - 1  # (..., 1) in [-1, 1]
        return t * self.embed.weight[:, 0] + self.embed.bias  # (..., D)

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        bounded = self.scalar(z)
        rounded = straight_through(bounded, bounded.round())  # (B, N, 1) integer m
        codes = codes_lib.index_to_digits(rounded.detach().long().squeeze(-1), self.radices)  # (B, N, G)
        return QuantizerOutput(z_q=self.embed_integer(rounded), codes=codes)

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        return codes_lib.index_to_digits(self.scalar(z).round().long().squeeze(-1), self.radices)

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        m = codes_lib.digits_to_index(codes, self.radices)  # (...)
        return self.embed_integer(m.float().unsqueeze(-1))
