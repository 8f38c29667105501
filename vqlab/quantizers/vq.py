"""Straight-through vector quantization ("vq").

Neural Discrete Representation Learning (van den Oord et al., 2017), https://arxiv.org/abs/1711.00937.

Each token is replaced by its nearest code in a learned codebook of ``K`` vectors
(``radices == (K,)``). The codebook learns from the codebook loss ``‖sg[z] − e‖²`` and the encoder
from ``β‖z − sg[e]‖²`` plus the straight-through (or rotation-trick) gradient; both losses are means
over tokens and channels of the lookup space. The optional entropy loss is MaskGIT's (Chang et al.,
2022, https://arxiv.org/abs/2202.04200): over the soft assignments ``softmax(−‖z − e_k‖²/τ)``, the
mean per-token entropy minus the entropy of their mean over this rank's tokens, which pushes each
token to commit to one code and the batch to spread over many; it is computed one block of codes at
a time (``_softmax.py``), never as the (tokens, K) matrix. Init, low-dimensional and cosine
lookup, dead-code re-seeding and the rotation trick live in ``_codebook.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.quantizers._codebook import CodebookConfig, CodebookQuantizer, initial_codebook
from vqlab.quantizers._softmax import distance_softmax_entropies
from vqlab.quantizers.base import registry
from vqlab.schema import require


@dataclass(frozen=True)
class VQConfig(CodebookConfig):
    """``usage_decay``: EMA decay of the per-code usage counts (dead-code threshold, usage stat)."""

    name: str = "vq"
    usage_decay: float = 0.99
    entropy_weight: float = 0.0
    entropy_temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        require(0.0 <= self.usage_decay < 1.0, "usage_decay", f"must be in [0, 1), got {self.usage_decay}")
        require(self.entropy_weight >= 0, "entropy_weight", f"must be >= 0, got {self.entropy_weight}")
        require(self.entropy_temperature > 0, "entropy_temperature", f"must be > 0, got {self.entropy_temperature}")


@registry.register("vq", VQConfig)
class VQ(CodebookQuantizer):
    cfg: VQConfig
    mean_losses = frozenset({"codebook", "commitment"})

    def __init__(self, cfg: VQConfig):
        super().__init__(cfg, usage_decay=cfg.usage_decay)
        self.embedding = nn.Parameter(initial_codebook(cfg.codebook_size, cfg.lookup_dim, cfg.init))

    def codebook_losses(
        self, latents: torch.Tensor, quantized: torch.Tensor, codebook: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        losses = {
            "codebook": F.mse_loss(quantized, latents.detach()),
            "commitment": self.cfg.beta * F.mse_loss(latents, quantized.detach()),
        }
        if self.cfg.entropy_weight > 0:
            flat = latents.reshape(-1, latents.shape[-1])  # (B*N, d)
            per_token, spread = distance_softmax_entropies(flat, codebook, self.cfg.entropy_temperature)
            losses["entropy"] = self.cfg.entropy_weight * (per_token - spread)
        return losses
