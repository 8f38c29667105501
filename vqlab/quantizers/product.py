"""Product (grouped) quantization over any base quantizer ("product").

Jégou, Douze & Schmid, "Product quantization for nearest neighbor search", IEEE TPAMI 33(1), 2011,
https://doi.org/10.1109/TPAMI.2010.57

The D input channels are split into ``groups`` contiguous slices of the base quantizer's width;
each slice is quantized by its own base quantizer (one shared module when ``shared``) and the
outputs are concatenated. Codes are ``(B, N, groups)``: group g's column is the flat index of its
base digits (the one index helper, ``vqlab.codes``), so ``radices == (base.codebook_size,) * groups``.

Each group's losses are divided by ``groups``: a base loss is a mean over its slice's elements,
so the sum over groups is then the mean over all D channels, on the same scale as one quantizer
of the full width and independent of how many groups the width is cut into.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vqlab import codes as codes_lib
from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry
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
        require(
            getattr(registry.get(self.base.name).builder, "discrete", True),
            "base",
            f"{self.base.name!r} is continuous; product groups need a quantizer with codes",
        )
        require(self.dim >= 0, "dim", f"must be >= 0 (0 = groups x the base's width), got {self.dim}")
        require(self.dim % self.groups == 0, "dim", f"{self.dim} is not divisible by groups ({self.groups})")


@registry.register("product", ProductConfig)
class Product(Quantizer):
    def __init__(self, cfg: ProductConfig):
        super().__init__()
        from vqlab.quantizers import build  # the package finishes importing after its modules

        self.cfg = cfg
        self.quantizers = nn.ModuleList(build(cfg.base) for _ in range(1 if cfg.shared else cfg.groups))
        base = self.quantizers[0]
        self.group_dim = base.dim
        self.dim = cfg.groups * base.dim
        require(
            cfg.dim in (0, self.dim),
            "dim",
            f"{cfg.dim} is not groups ({cfg.groups}) x the base's width ({base.dim}) = {self.dim}",
        )
        require(
            codes_lib.fits_int64(base.radices),
            "base",
            f"a group's codebook of {base.codebook_size} codes does not fit an int64 index",
        )
        self.base_radices = tuple(base.radices)
        self.radices = (base.codebook_size,) * cfg.groups

    def group(self, g: int) -> Quantizer:
        return self.quantizers[0 if self.cfg.shared else g]

    def set_step(self, step: int, total_steps: int) -> None:
        for quantizer in self.quantizers:
            quantizer.set_step(step, total_steps)

    def on_optimizer_step(self) -> None:
        # self.quantizers holds each module once, so a shared one applies its updates once per step
        for quantizer in self.quantizers:
            quantizer.on_optimizer_step()

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        parts, codes, losses, stats = [], [], {}, {}
        for g, chunk in enumerate(z.split(self.group_dim, dim=-1)):  # (B, N, D / groups) each
            out = self.group(g)(chunk)
            parts.append(out.z_q)
            codes.append(codes_lib.digits_to_index(out.codes, self.base_radices))  # (B, N)
            losses |= {f"group{g}/{name}": value / self.cfg.groups for name, value in out.losses.items()}
            stats |= {f"group{g}/{name}": value for name, value in out.stats.items()}
        return QuantizerOutput(
            z_q=torch.cat(parts, dim=-1), codes=torch.stack(codes, dim=-1), losses=losses, stats=stats
        )

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        chunks = z.split(self.group_dim, dim=-1)
        codes = [codes_lib.digits_to_index(self.group(g).encode(c), self.base_radices) for g, c in enumerate(chunks)]
        return torch.stack(codes, dim=-1)  # (B, N, groups)

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        parts = [
            self.group(g).decode(codes_lib.index_to_digits(codes[..., g], self.base_radices))  # (..., D / groups)
            for g in range(self.cfg.groups)
        ]
        return torch.cat(parts, dim=-1)  # (..., D)
