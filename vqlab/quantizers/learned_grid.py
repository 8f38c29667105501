"""Learned scalar grid ("learned_grid"): FSQ whose per-dimension level values are learned.

Disentanglement via Latent Quantization (Hsu, Dorrell, Whittington, Wu and Finn, 2023),
https://arxiv.org/abs/2305.18378, Section 3 (the per-dimension value codebooks of its QLAE), on
Finite Scalar Quantization's bounded latent (Mentzer et al., 2023, https://arxiv.org/abs/2309.15505).

Each token is bounded exactly as FSQ bounds it (``vqlab.quantizers.fsq``: tanh to the half-width of
its levels, divided by it, so ``b`` lies in about [-1, 1]). Dimension i then snaps to the nearest of
its own ``L_i`` learned values ``v_i``: digit ``k = argmin_j |b_i − v_ij|`` and ``q_i = v_ik``, with
a straight-through gradient to ``b``. The values start on FSQ's grid, ``(j − ⌊L/2⌋) / ⌊L/2⌋``, so an
untrained learned grid is FSQ exactly (same digits, same ``z_q``). They learn from the codebook loss
``‖sg[b] − q‖²`` and the encoder from the commitment loss ``β ‖b − sg[q]‖²`` (both means), as a VQ
codebook does. ``radices == levels``; decode looks each digit up in its dimension's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry, straight_through
from vqlab.quantizers.fsq import FSQ, FSQConfig
from vqlab.schema import require


@dataclass(frozen=True)
class LearnedGridConfig(QuantizerConfig):
    name: str = "learned_grid"
    levels: tuple[int, ...] = (8, 5, 5, 5)
    eps: float = 1e-3  # FSQ's bound (``FSQConfig.eps``)
    codebook_weight: float = 1.0
    commitment_weight: float = 0.25

    def __post_init__(self):
        FSQConfig(levels=self.levels, eps=self.eps)  # the same checks as FSQ's, under the same keys
        require(self.codebook_weight >= 0, "codebook_weight", f"must be >= 0, got {self.codebook_weight}")
        require(self.commitment_weight >= 0, "commitment_weight", f"must be >= 0, got {self.commitment_weight}")


def fsq_values(level: int) -> torch.Tensor:
    """FSQ's ``z_q`` values of one dimension of ``level`` levels: ``(j − ⌊L/2⌋) / ⌊L/2⌋``."""
    return (torch.arange(level, dtype=torch.float32) - level // 2) / (level // 2)


@registry.register("learned_grid", LearnedGridConfig)
class LearnedGrid(Quantizer):
    mean_losses = frozenset({"codebook", "commitment"})

    def __init__(self, cfg: LearnedGridConfig):
        super().__init__()
        self.cfg = cfg
        self.radices = tuple(cfg.levels)
        self.dim = len(cfg.levels)
        self.fsq = FSQ(FSQConfig(levels=cfg.levels, eps=cfg.eps))  # its relaxed() is the bounded latent
        self.values = nn.ParameterList([nn.Parameter(fsq_values(level)) for level in cfg.levels])

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        return self.fsq.relaxed(z)  # (B, N, D), about [-1, 1]

    def snap(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, D)`` bounded latents -> (digits ``(B, N, D)``, their values ``(B, N, D)``)."""
        digits, snapped = [], []
        for i, values in enumerate(self.values):  # D is small: one nearest-value search per dimension
            digit = (b[..., i, None] - values).abs().argmin(-1)  # (B, N)
            digits.append(digit)
            snapped.append(values[digit])
        return torch.stack(digits, dim=-1), torch.stack(snapped, dim=-1)

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        b = self.relaxed(z)  # (B, N, D)
        codes, q = self.snap(b)  # (B, N, D) digits and values
        losses = {}
        if self.cfg.codebook_weight > 0:
            losses["codebook"] = self.cfg.codebook_weight * F.mse_loss(q, b.detach())
        if self.cfg.commitment_weight > 0:
            losses["commitment"] = self.cfg.commitment_weight * F.mse_loss(b, q.detach())
        return QuantizerOutput(z_q=straight_through(b, q), codes=codes, losses=losses)

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        return self.snap(self.relaxed(z))[0]

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.stack([values[codes[..., i]] for i, values in enumerate(self.values)], dim=-1)
