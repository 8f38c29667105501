"""Binary spherical quantization (BSQ).

Image and Video Tokenization with Binary Spherical Quantization (Zhao, Xiong and Krähenbühl, 2024),
https://arxiv.org/abs/2406.07548, Section 3.

A token is projected onto the unit sphere, ``u = z / ‖z‖``, and each of its d dims is quantized
to its sign scaled by ``1/√d``: ``q = sign(u) / √d``, itself on the unit sphere, with a
straight-through gradient to ``u``. The implicit codebook is the 2^d corners of the hypercube
inscribed in the sphere, ``radices == (2,) * d``, digit i is 1 for ``+1/√d`` (as LFQ's bits).

Entropy terms, as the paper's: the soft assignment ``p(c|u) ∝ exp(−‖u − c‖² / τ)`` over the 2^d
codes (``τ`` is ``entropy_temperature``) is a product of independent bits with
``p(c_i = +1/√d | u_i) = sigmoid(4 u_i / (√d τ))``. The per-sample entropy ``E[H(p(c|u))]`` is
therefore exactly the sum of the per-bit entropies, at ``O(tokens · d)``. The codebook entropy
``H(E[p(c|u)])`` is the paper's factorised approximation over groups of ``group_bits`` bits: the
sum over groups of the entropy of the batch-mean distribution of each group's 2^g codes, exact
within a group, an upper bound of the joint entropy that is blind to dependence between groups
(LFQ's computation, ``O(tokens · 2^g)`` per group). ``group_bits: 1`` is the per-bit form, blind to
any dependence between bits: on the photos its bits each stayed balanced while the codes collapsed
(README, "Recent quantizers"); the default 10 is exact up to 10 bits, as LFQ's, and the authors'
code groups 9. The loss
is ``entropy_weight · (E[H] − γ H(E[p]))`` plus ``commitment_weight · ‖u − q‖²`` (mean). The batch
is this process's tokens (per rank under DDP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry
from vqlab.quantizers.lfq import (
    MAX_GROUP_BITS,
    bit_entropy,
    grouped_codebook_entropy,
    register_bit_tables,
    sign_output,
)
from vqlab.schema import require

MAX_BITS = 62  # keeps every flat index inside int64 with room to spare


@dataclass(frozen=True)
class BSQConfig(QuantizerConfig):
    name: str = "bsq"
    dim: int = 10  # bits; the implicit codebook has 2^dim codes
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25
    diversity_gamma: float = 1.0
    entropy_temperature: float = 0.1
    group_bits: int = 10  # bits per group of the codebook entropy: exact within a group

    def __post_init__(self):
        require(2 <= self.dim <= MAX_BITS, "dim", f"must be between 2 and {MAX_BITS} bits, got {self.dim}")
        require(self.entropy_weight >= 0, "entropy_weight", f"must be >= 0, got {self.entropy_weight}")
        require(self.commitment_weight >= 0, "commitment_weight", f"must be >= 0, got {self.commitment_weight}")
        require(self.diversity_gamma >= 0, "diversity_gamma", f"must be >= 0, got {self.diversity_gamma}")
        require(self.entropy_temperature > 0, "entropy_temperature", f"must be > 0, got {self.entropy_temperature}")
        require(
            1 <= self.group_bits <= MAX_GROUP_BITS,
            "group_bits",
            f"must be between 1 and {MAX_GROUP_BITS} (memory grows as tokens * 2^group_bits), got {self.group_bits}",
        )


@registry.register("bsq", BSQConfig)
class BSQ(Quantizer):
    mean_losses = frozenset({"commitment"})

    def __init__(self, cfg: BSQConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.radices = (2,) * cfg.dim
        register_bit_tables(self, cfg.dim, cfg.group_bits)

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z.float(), dim=-1)  # u, in z_q's space: z_q = sign(u) / √d

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        u = F.normalize(z, dim=-1)  # (B, N, D) on the unit sphere
        q = torch.where(u > 0, 1.0, -1.0) / self.dim**0.5  # (B, N, D), also on the sphere
        return sign_output(u, q, self.entropies(u.reshape(-1, self.dim)), self.cfg)

    def entropies(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, D)`` unit tokens -> (E[H(p(c|u))], group-factorised H(E[p(c|u)])) in nats."""
        # ‖u − c₊‖² − ‖u − c₋‖² = −4 u_i / √d for the two values of bit i: its logit times τ
        logit = 4 * u / (self.dim**0.5 * self.cfg.entropy_temperature)  # (T, D)
        sample_entropy = bit_entropy(logit).sum(dim=-1).mean()
        return sample_entropy, grouped_codebook_entropy(self, logit, self.cfg.group_bits)

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        return (z > 0).long()  # the sign of u = z / ‖z‖ is the sign of z

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.where(codes == 1, 1.0, -1.0) / self.dim**0.5
