"""Residual quantization over any base quantizer ("rvq").

SoundStream: An End-to-End Neural Audio Codec (Zeghidour et al., 2021), https://arxiv.org/abs/2107.03312
(residual vector quantization, Algorithm 1, and quantizer dropout; multistage VQ goes back to Juang & Gray,
"Multiple stage vector quantization for speech coding", ICASSP 1982).

Stage k quantizes the residual ``r_k = z - sum_{j<k} zq_j`` with its own base quantizer (one shared
module when ``shared``) and ``z_q = sum_k zq_k``. Each stage's losses come from the base quantizer
called on its own residual, under the keys ``stage{k}/<loss>``.

Gradient. The next residual subtracts the stage output *without* detaching it, as EnCodec does
(High Fidelity Neural Audio Compression, Défossez et al., 2022, https://arxiv.org/abs/2210.13438,
and its ``ResidualVectorQuantization``). Then ``z_q = z - r_K`` for the K stages summed, so
``dz_q/dz = I - dr_K/dz = I - prod_k (I - J_k)`` with ``J_k`` stage k's Jacobian. For a
straight-through stage (lfq; vq and vq_ema with the ``ste`` estimator, no projection or cosine)
``J_k = I``, so the gradient reaching ``z`` is exactly the identity, whatever the depth and however
many stages quantize dropout keeps; detaching the residual instead would give every stage its own
identity path, depth x I, changing from step to step under dropout.

Losses: each is still its base's loss on its own residual (the values do not depend on the detach). Stage
0's reach the encoder as a single quantizer's would. Under straight-through a later stage's
residual is constant to ``z`` (``dr_k/dz = 0``), so its losses do not move the encoder: they train
that stage's own parameters (a VQ codebook through its codebook loss, projections, Gumbel logits)
and, back through the residual, the non-straight-through parts of the stages before it; for
parameter-free straight-through stages (lfq, plain vq_ema) they are reported only. The encoder is
pulled towards the first stage's code, as in EnCodec, rather than towards every partial sum.

Per-stage scaling (``scaling``): an FSQ stage outputs a grid in [-1, 1] whose step is about
2 / (L - 1), so its residual is about 1 / (L - 1) wide and would use a sliver of the next grid.
With ``levels`` scaling, stage k quantizes ``r_k / s_k`` and contributes ``s_k * q_k`` with
``s_k = (L_i - 1) ** -k`` per channel i, the choice of ResidualFSQ in vector-quantize-pytorch
(https://github.com/lucidrains/vector-quantize-pytorch).
``auto`` applies it to an ``fsq`` base and no scaling to any other.

Codes are ``(B, N, depth)``: stage k's column is the flat index of its base digits (the one index
helper, ``vqlab.codes``), so ``radices == (base.codebook_size,) * depth``.

Quantize dropout (``quantize_dropout = p``): with probability p a training step keeps only the
first k stages in ``z_q``, k uniform in 1..depth (the DAC recipe, drawn per step rather than per
example). The draw comes from a generator seeded with ``(dropout_seed, step)`` from ``set_step``,
so every DDP rank truncates alike; without ``set_step`` the step stays 0. All stages still run,
report their codes and losses and gather their statistics, so the autograd graph and the state
updates are the same on every step and rank; only the sum forming ``z_q`` is truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from vqlab.quantizers._composite import Composite, require_discrete_base
from vqlab.quantizers.base import QuantizerConfig, QuantizerOutput, registry
from vqlab.quantizers.fsq import FSQConfig
from vqlab.schema import require


@dataclass(frozen=True)
class RVQConfig(QuantizerConfig):
    name: str = "rvq"
    depth: int = 2
    base: QuantizerConfig = field(default_factory=lambda: FSQConfig(levels=(8, 4)))
    shared: bool = False  # one base quantizer (one codebook) for every stage
    scaling: Literal["auto", "none", "levels"] = "auto"
    quantize_dropout: float = 0.0  # probability that a training step truncates z_q to k ~ U{1..depth} stages
    dropout_seed: int = 0

    def __post_init__(self):
        require(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        require_discrete_base(self.base, "residual stages")
        require(
            self.scaling != "levels" or self.base.name == "fsq",
            "scaling",
            f"'levels' scaling is for an fsq base, got {self.base.name!r}",
        )
        require(
            0.0 <= self.quantize_dropout <= 1.0, "quantize_dropout", f"must be in [0, 1], got {self.quantize_dropout}"
        )
        require(
            self.quantize_dropout == 0.0 or self.depth >= 2, "quantize_dropout", "needs depth >= 2 to drop any stage"
        )
        require(0 <= self.dropout_seed < 2**31, "dropout_seed", f"must be in [0, 2**31), got {self.dropout_seed}")


@registry.register("rvq", RVQConfig)
class RVQ(Composite):
    def __init__(self, cfg: RVQConfig):
        super().__init__(cfg.base, cfg.depth, cfg.shared)
        self.cfg = cfg
        self.dim = self.parts[0].dim
        if cfg.scaling == "levels" or (cfg.scaling == "auto" and cfg.base.name == "fsq"):
            steps = torch.tensor(cfg.base.levels, dtype=torch.float32) - 1
            scales = torch.stack([steps ** (-k) for k in range(cfg.depth)])
        else:
            scales = torch.ones(cfg.depth, self.dim)
        self.register_buffer("scales", scales, persistent=False)  # (depth, D)
        self.mean_losses = self.prefixed_mean_losses("stage", cfg.depth)  # each stage's are over all of z
        self._step = 0

    def set_step(self, step: int, total_steps: int) -> None:
        self._step = step
        super().set_step(step, total_steps)

    def active_depth(self) -> int:
        """Stages summed into ``z_q`` by the next forward: ``depth`` unless quantize dropout fires."""
        if not self.training or self.cfg.quantize_dropout == 0.0:
            return self.cfg.depth
        generator = torch.Generator().manual_seed(self.cfg.dropout_seed * 2**32 + self._step)
        fires = torch.rand((), generator=generator).item() < self.cfg.quantize_dropout
        depth = int(torch.randint(1, self.cfg.depth + 1, (), generator=generator))
        return depth if fires else self.cfg.depth

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        active = self.active_depth()
        residual = z  # (B, N, D)
        z_q = torch.zeros_like(z)  # (B, N, D)
        codes, losses, stats = [], {}, {}
        for k in range(self.cfg.depth):
            out = self.part(k)(residual / self.scales[k])
            stage_q = out.z_q * self.scales[k]  # (B, N, D)
            if k < active:
                z_q = z_q + stage_q
            residual = residual - stage_q  # not detached: see the module docstring
            codes.append(self.pack(out.codes))  # (B, N)
            losses |= {f"stage{k}/{name}": value for name, value in out.losses.items()}
            stats |= {f"stage{k}/{name}": value for name, value in out.stats.items()}
        stats["active_depth"] = torch.tensor(float(active), device=z.device)
        return QuantizerOutput(z_q=z_q, codes=torch.stack(codes, dim=-1), losses=losses, stats=stats)

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        residual = z  # (B, N, D)
        codes = []
        for k in range(self.cfg.depth):
            digits = self.part(k).encode(residual / self.scales[k])  # (B, N, G_base)
            residual = residual - self.part(k).decode(digits) * self.scales[k]
            codes.append(self.pack(digits))
        return torch.stack(codes, dim=-1)  # (B, N, depth)

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        z_q = torch.zeros(*codes.shape[:-1], self.dim, device=codes.device)  # (..., D)
        for k in range(self.cfg.depth):
            z_q = z_q + self.part(k).decode(self.unpack(codes, k)) * self.scales[k]
        return z_q
