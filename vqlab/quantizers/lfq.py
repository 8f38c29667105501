"""Lookup-free quantization (LFQ).

Language Model Beats Diffusion -- Tokenizer is Key to Visual Generation (Yu et al., 2023),
https://arxiv.org/abs/2310.05737, Section 3.1.

Each of the d dims is quantized to its sign, ``q_i = scale if z_i > 0 else -scale``, with a
straight-through gradient; digit i is 1 for ``+scale``, so the implicit codebook is {-s, s}^d with
``radices == (2,) * d``. The entropy loss is ``E[H(p(q|z))] - gamma * H(E[p(q|z)])`` with the soft
assignment ``p(q|z) ∝ exp(-||z - q||^2 / tau)`` over all 2^d codes (``tau`` is
``entropy_temperature``; ``1 / tau`` is the reference implementation's ``inv_temperature``).

Because ``||z - q||^2`` is a sum over dims, ``p(q|z)`` is a product of independent bits with
``p(q_i = +s | z_i) = sigmoid(4 s z_i / tau)``, so the per-sample entropy is exactly the sum of
the per-bit entropies and never needs the 2^d codes. The batch ("codebook") entropy does not
factorise: the mean of product distributions is not a product. When ``group_bits >= dim`` it is
computed exactly over the 2^d codes. Otherwise it is the factorised approximation: the bits are
split into consecutive groups of ``group_bits`` (the last may be smaller), the exact marginal of
each group's 2^group_bits codes is averaged over the batch, and the group entropies are summed.
That sum is an upper bound of the joint entropy that rewards uniform use within each group but not
independence between groups; memory grows as 2^group_bits, not 2^d. The batch is this process's
tokens (per rank under DDP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry, straight_through
from vqlab.schema import require

MAX_BITS = 62  # keeps every flat index inside int64 with room to spare
MAX_GROUP_BITS = 16  # 2^16 probabilities per token is already ~256 MiB for 1024 tokens


@dataclass(frozen=True)
class LFQConfig(QuantizerConfig):
    name: str = "lfq"
    dim: int = 10  # bits; the implicit codebook has 2^dim codes
    scale: float = 1.0
    # The reference implementation's weights (lucidrains/vector-quantize-pytorch). Its temperature
    # 0.01 (inv_temperature 100) saturates every bit's sigmoid once |z| > 0.02, so the entropy terms
    # lose their gradient: on the photos (sweep ``codebook_usage``) 0.01 used 0.8% of 1024 codes at
    # val L1 0.100, 0.1 used 39% at 0.079, 1.0 used 25% at 0.082.
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25
    diversity_gamma: float = 1.0
    entropy_temperature: float = 0.1
    # Bits per sub-group of the batch entropy; group_bits >= dim is the exact 2^dim form.
    group_bits: int = 10

    def __post_init__(self):
        require(1 <= self.dim <= MAX_BITS, "dim", f"must be between 1 and {MAX_BITS} bits, got {self.dim}")
        require(self.scale > 0, "scale", f"must be > 0, got {self.scale}")
        require(self.entropy_weight >= 0, "entropy_weight", f"must be >= 0, got {self.entropy_weight}")
        require(self.commitment_weight >= 0, "commitment_weight", f"must be >= 0, got {self.commitment_weight}")
        require(self.diversity_gamma >= 0, "diversity_gamma", f"must be >= 0, got {self.diversity_gamma}")
        require(self.entropy_temperature > 0, "entropy_temperature", f"must be > 0, got {self.entropy_temperature}")
        require(
            1 <= self.group_bits <= MAX_GROUP_BITS,
            "group_bits",
            f"must be between 1 and {MAX_GROUP_BITS} (memory grows as tokens * 2^group_bits), got {self.group_bits}",
        )


def bit_table(bits: int) -> torch.Tensor:
    """``(2^bits, bits)`` float 0/1 digits of every code of a group, digit 0 least significant."""
    codes = torch.arange(2**bits)
    return ((codes[:, None] >> torch.arange(bits)) & 1).float()


def entropy(p: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last dim; the clamp keeps the gradient finite where p underflows to 0."""
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=-1)


def bit_entropy(logit: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of Bernoulli(sigmoid(logit)), elementwise, stable for large |logit|."""
    log_one, log_zero = F.logsigmoid(logit), F.logsigmoid(-logit)
    return -(log_one.exp() * log_one + log_zero.exp() * log_zero)


def register_bit_tables(module: nn.Module, dim: int, group_bits: int) -> None:
    """Buffers ``bits_<g>`` (``bit_table(g)``) for each group size of ``dim`` bits split by ``group_bits``."""
    for size in {min(group_bits, dim - start) for start in range(0, dim, group_bits)}:
        module.register_buffer(f"bits_{size}", bit_table(size), persistent=False)


def grouped_codebook_entropy(module: nn.Module, logit: torch.Tensor, group_bits: int) -> torch.Tensor:
    """From ``(T, d)`` bit logits (bit i is 1 with probability ``sigmoid(logit_i)``, independently):
    the sum over consecutive groups of ``group_bits`` bits of the entropy of the batch-mean
    distribution over each group's 2^g codes, exact within a group (``module`` holds the tables)."""
    total = logit.new_zeros(())
    for group in logit.split(group_bits, dim=-1):
        bits = getattr(module, f"bits_{group.shape[-1]}")  # (2^g, g)
        # (T, 2^g): log p of each code of the group, the exact marginal of the group's bits
        log_p = F.logsigmoid(group) @ bits.T + F.logsigmoid(-group) @ (1 - bits).T
        total = total + entropy(log_p.exp().mean(dim=0))
    return total


class SignLossWeights(Protocol):
    entropy_weight: float
    diversity_gamma: float
    commitment_weight: float


def sign_output(
    x: torch.Tensor, q: torch.Tensor, entropies: tuple[torch.Tensor, torch.Tensor], cfg: SignLossWeights
) -> QuantizerOutput:
    """What a sign quantizer (LFQ, BSQ) returns for tokens ``x`` ``(B, N, D)`` and their scaled signs
    ``q``: ``z_q = q`` straight through to ``x``, digit 1 where ``x > 0``, the entropy loss
    ``w (E[H] − γ H(E[p]))`` from ``entropies`` (per-sample, codebook) and the commitment ``w ‖x − q‖²``
    (mean), under ``cfg``'s weights."""
    sample_entropy, codebook_entropy = entropies
    commitment = (x - q).square().mean()
    losses = {}
    if cfg.entropy_weight > 0:
        losses["entropy"] = cfg.entropy_weight * (sample_entropy - cfg.diversity_gamma * codebook_entropy)
    if cfg.commitment_weight > 0:
        losses["commitment"] = cfg.commitment_weight * commitment
    stats = {
        "sample_entropy": sample_entropy.detach(),
        "codebook_entropy": codebook_entropy.detach(),
        "commitment_mse": commitment.detach(),
    }
    return QuantizerOutput(z_q=straight_through(x, q), codes=(x > 0).long(), losses=losses, stats=stats)


@registry.register("lfq", LFQConfig)
class LFQ(Quantizer):
    mean_losses = frozenset({"commitment"})

    def __init__(self, cfg: LFQConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.radices = (2,) * cfg.dim
        register_bit_tables(self, cfg.dim, cfg.group_bits)

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        q = torch.where(z > 0, self.cfg.scale, -self.cfg.scale)  # (B, N, D)
        return sign_output(z, q, self.entropies(z.reshape(-1, self.dim)), self.cfg)

    def entropies(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, D)`` tokens -> (E[H(p(q|z))], factorised H(E[p(q|z)])) in nats."""
        # ||z - s||^2 - ||z + s||^2 = -4 s z: the logit of bit i being +s
        logit = 4 * self.cfg.scale * z / self.cfg.entropy_temperature  # (T, D)
        sample_entropy = bit_entropy(logit).sum(dim=-1).mean()

        return sample_entropy, grouped_codebook_entropy(self, logit, self.cfg.group_bits)

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        return (z > 0).long()

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.where(codes == 1, self.cfg.scale, -self.cfg.scale)
