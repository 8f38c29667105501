"""Product (grouped) quantization over any base quantizer ("product").

Jégou, Douze & Schmid, "Product quantization for nearest neighbor search", IEEE TPAMI 33(1), 2011,
https://doi.org/10.1109/TPAMI.2010.57

The D input channels are split into ``groups`` contiguous slices of the base quantizer's width;
each slice is quantized by its own base quantizer (one shared module when ``shared``) and the
outputs are concatenated. Codes are ``(B, N, groups)``: group g's column is the flat index of its
base digits (the one index helper, ``vqlab.codes``), so ``radices == (base.codebook_size,) * groups``.

Losses weigh as those of one quantizer over the full width, however the width is cut. A base
declares which of its losses are means over its slice's elements (``Quantizer.mean_losses``: the
MSE commitment and codebook losses); those are divided by ``groups``, so that their sum over the
groups is the mean over all D channels. The others are sums over a token's channels or codes
(LFQ's entropies, the Gumbel KL, VQ's entropy) and add up over groups unchanged: the groups'
soft assignments multiply into the product's, so its per-token entropy and its KL to the uniform
prior are exactly the sums of the groups', and the sum of the groups' batch entropies is the
factorised form that LFQ's ``group_bits`` uses (two 4-bit LFQ groups give exactly the losses of
one 8-bit LFQ with ``group_bits = 4``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vqlab.quantizers._composite import Composite, require_discrete_base
from vqlab.quantizers.base import QuantizerConfig, QuantizerOutput, registry
from vqlab.quantizers.fsq import FSQConfig
from vqlab.schema import require


@dataclass(frozen=True)
class ProductConfig(QuantizerConfig):
    name: str = "product"
    groups: int = 2
    base: QuantizerConfig = field(default_factory=lambda: FSQConfig(levels=(8, 4)))
    shared: bool = False  # one base quantizer (one codebook) for every group
    dim: int = 0  # input width; 0 = groups x the base's width, else it must equal that

    def __post_init__(self):
        require(self.groups >= 1, "groups", f"must be >= 1, got {self.groups}")
        require_discrete_base(self.base, "product groups")
        require(self.dim >= 0, "dim", f"must be >= 0 (0 = groups x the base's width), got {self.dim}")
        require(self.dim % self.groups == 0, "dim", f"{self.dim} is not divisible by groups ({self.groups})")


@registry.register("product", ProductConfig)
class Product(Composite):
    def __init__(self, cfg: ProductConfig):
        super().__init__(cfg.base, cfg.groups, cfg.shared)
        self.cfg = cfg
        self.group_dim = self.parts[0].dim
        # A group's mean loss divided by groups is its share of the mean over every channel.
        self.mean_losses = self.prefixed_mean_losses("group", cfg.groups)
        self.dim = cfg.groups * self.group_dim
        require(
            cfg.dim in (0, self.dim),
            "dim",
            f"{cfg.dim} is not groups ({cfg.groups}) x the base's width ({self.group_dim}) = {self.dim}",
        )

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        parts, codes, losses, stats = [], [], {}, {}
        for g, chunk in enumerate(z.split(self.group_dim, dim=-1)):  # (B, N, D / groups) each
            out = self.part(g)(chunk)
            parts.append(out.z_q)
            codes.append(self.pack(out.codes))  # (B, N)
            losses |= {f"group{g}/{name}": self.weigh(name, value) for name, value in out.losses.items()}
            stats |= {f"group{g}/{name}": value for name, value in out.stats.items()}
        return QuantizerOutput(
            z_q=torch.cat(parts, dim=-1), codes=torch.stack(codes, dim=-1), losses=losses, stats=stats
        )

    def weigh(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        """A group's loss as a term of the full-width one: a per-element mean is averaged over the
        groups, a sum over channels or codes (entropy, KL) adds up."""
        return loss / self.cfg.groups if name in self.parts[0].mean_losses else loss

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        chunks = z.split(self.group_dim, dim=-1)
        codes = [self.pack(self.part(g).encode(c)) for g, c in enumerate(chunks)]
        return torch.stack(codes, dim=-1)  # (B, N, groups)

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        parts = [
            self.part(g).decode(self.unpack(codes, g))  # (..., D / groups)
            for g in range(self.cfg.groups)
        ]
        return torch.cat(parts, dim=-1)  # (..., D)
