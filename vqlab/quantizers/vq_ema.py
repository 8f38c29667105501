"""Vector quantization with an exponential-moving-average codebook ("vq_ema").

Neural Discrete Representation Learning (van den Oord et al., 2017), https://arxiv.org/abs/1711.00937,
Appendix A.1, with the Laplace smoothing of Generating Diverse High-Fidelity Images with VQ-VAE-2
(Razavi et al., 2019), https://arxiv.org/abs/1906.00446, as in Sonnet's ``VectorQuantizerEMA``.

The codebook is a buffer that follows the running means of the latents assigned to each code; the
encoder only gets the commitment loss ``β‖z − sg[e]‖²`` (mean over tokens and channels) and the
straight-through (or rotation-trick) gradient. With ``n_k`` tokens and ``Σz`` their sum assigned to
code k during one optimizer step (all forwards of the gradient-accumulation window, all ranks):

    N_k ← γN_k + (1−γ)n_k,   m_k ← γm_k + (1−γ)Σz,   Ñ_k = (N_k+ε)/(ΣN + Kε)·ΣN,   e_k = m_k/Ñ_k

applied once per optimizer step in ``on_optimizer_step``. ``N_k`` starts at 1 and ``m_k`` at the
initial code, so an unused code is not blown up by a tiny denominator. The window
statistics are all-reduced in place on the real buffers, so every rank holds the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqlab.quantizers._codebook import CodebookConfig, CodebookQuantizer, initial_codebook
from vqlab.quantizers.base import registry
from vqlab.schema import require


@dataclass(frozen=True)
class VQEMAConfig(CodebookConfig):
    """``decay`` is γ for the codebook and the usage counts; ``eps`` is the Laplace smoothing ε."""

    name: str = "vq_ema"
    decay: float = 0.99
    eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        require(0.0 <= self.decay < 1.0, "decay", f"must be in [0, 1), got {self.decay}")
        require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")


@registry.register("vq_ema", VQEMAConfig)
class VQEMA(CodebookQuantizer):
    cfg: VQEMAConfig
    mean_losses = frozenset({"commitment"})

    def __init__(self, cfg: VQEMAConfig):
        # The usage EMA is N_k: it shares the codebook's decay and is reset with it.
        super().__init__(cfg, usage_decay=cfg.decay)
        embedding = initial_codebook(cfg.codebook_size, cfg.lookup_dim, cfg.init)
        self.register_buffer("embedding", embedding)
        self.register_buffer("embed_sum", embedding * self.usage.ema[:, None])  # m_k
        self.register_buffer("window_sum", torch.zeros_like(embedding), persistent=False)  # Σz this step

    def codebook_losses(
        self, latents: torch.Tensor, quantized: torch.Tensor, codebook: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"commitment": self.cfg.beta * F.mse_loss(latents, quantized.detach())}

    def accumulate(self, latents: torch.Tensor, index: torch.Tensor) -> None:
        self.window_sum.index_add_(0, index, latents)

    def window_buffers(self) -> list[torch.Tensor]:
        return [*super().window_buffers(), self.window_sum]

    def update_codebook_(self) -> None:
        self.embed_sum.mul_(self.cfg.decay).add_(self.window_sum, alpha=1 - self.cfg.decay)
        counts = self.usage.ema  # (K,) N_k, already updated with this window
        total = counts.sum()
        smoothed = (counts + self.cfg.eps) / (total + self.cfg.codebook_size * self.cfg.eps) * total
        self.embedding.copy_(self.embed_sum / smoothed[:, None])

    def write_codes_(self, mask: torch.Tensor, vectors: torch.Tensor) -> None:
        super().write_codes_(mask, vectors)
        # A re-seeded code restarts its running sum consistently with its reset count.
        self.embed_sum.copy_(torch.where(mask[:, None], vectors * self.usage.ema[:, None], self.embed_sum))
