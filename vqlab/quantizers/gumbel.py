"""Gumbel-softmax VQ, as in DALL-E's dVAE.

Categorical Reparameterization with Gumbel-Softmax (Jang, Gu and Poole, 2016),
https://arxiv.org/abs/1611.01144; used as the dVAE relaxation of Zero-Shot Text-to-Image
Generation (Ramesh et al., 2021), https://arxiv.org/abs/2102.12092.

A linear layer maps each token to K logits. In training, a relaxed one-hot sample
``softmax((logits + g) / tau)`` (g Gumbel noise) mixes the rows of a learned (K, D) codebook; with
``hard`` the sample is the exact one-hot of its argmax in the forward pass and keeps the soft
sample's gradient. In eval there is no noise: ``z_q = codebook[argmax(logits)]``. The codes are
always the noise-free ``argmax(logits)``, so they are deterministic and equal ``encode(z)`` in both
modes; in training, ``z_q`` is the sample, which may pick a different row. The KL divergence of
``softmax(logits)`` from the uniform prior over the K codes keeps the posteriors from collapsing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry, straight_through
from vqlab.schema import require

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class GumbelConfig(QuantizerConfig):
    name: str = "gumbel"
    codebook_size: int = 1024
    dim: int = 64
    # DALL-E anneals tau from 1 to 1/16 with a cosine; here the anneal spans the whole run.
    temperature: float = 1.0
    temperature_end: float = 1.0 / 16
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    hard: bool = False
    # DALL-E's beta = 6.6 weighs one token's KL against the summed log-likelihood of the 8x8x3
    # pixels it covers; with per-element mean losses that is about 6.6 / 192.
    kl_weight: float = 0.03

    def __post_init__(self):
        require(self.codebook_size >= 2, "codebook_size", f"must be >= 2, got {self.codebook_size}")
        require(self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(self.temperature_end > 0, "temperature_end", f"must be > 0, got {self.temperature_end}")
        require(self.schedule in SCHEDULES, "schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        require(self.kl_weight >= 0, "kl_weight", f"must be >= 0, got {self.kl_weight}")


def scheduled_temperature(cfg: GumbelConfig, step: int, total_steps: int) -> float:
    """tau at ``step`` (0-based): ``temperature`` at step 0, ``temperature_end`` at the last step
    ``total_steps - 1`` and after; ``constant`` ignores ``temperature_end``."""
    if cfg.schedule == "constant":
        return cfg.temperature
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    shape = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.temperature_end + (cfg.temperature - cfg.temperature_end) * shape


@registry.register("gumbel", GumbelConfig)
class GumbelVQ(Quantizer):
    def __init__(self, cfg: GumbelConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.radices = (cfg.codebook_size,)
        self.to_logits = nn.Linear(cfg.dim, cfg.codebook_size)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.dim)
        self.temperature = cfg.temperature

    def set_step(self, step: int, total_steps: int) -> None:
        self.temperature = scheduled_temperature(self.cfg, step, total_steps)

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        logits = self.to_logits(z)  # (B, N, K)
        index = logits.argmax(dim=-1)  # (B, N)
        if self.training:
            # -log(Exp(1)) is Gumbel(0, 1) noise
            gumbels = -torch.empty_like(logits).exponential_().log()  # (B, N, K)
            sample = F.softmax((logits + gumbels) / self.temperature, dim=-1)  # (B, N, K)
            if self.cfg.hard:
                one_hot = F.one_hot(sample.argmax(dim=-1), self.cfg.codebook_size).to(sample.dtype)
                sample = straight_through(sample, one_hot)
            z_q = sample @ self.codebook.weight  # (B, N, D)
        else:
            z_q = self.codebook(index)  # (B, N, D)

        log_probs = F.log_softmax(logits, dim=-1)  # (B, N, K)
        # KL(q || U(K)) = sum_k q_k (log q_k + log K), averaged over tokens
        kl = (log_probs.exp() * (log_probs + math.log(self.cfg.codebook_size))).sum(dim=-1).mean()
        losses = {"kl": self.cfg.kl_weight * kl} if self.cfg.kl_weight > 0 else {}
        stats = {
            "kl_to_uniform": kl.detach(),
            "temperature": torch.tensor(self.temperature, device=z.device),
        }
        return QuantizerOutput(z_q=z_q, codes=index.unsqueeze(-1), losses=losses, stats=stats)

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_logits(z).argmax(dim=-1, keepdim=True)

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook(codes[..., 0])
