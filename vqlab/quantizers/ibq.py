"""Index backpropagation quantization ("ibq").

Taming Scalable Visual Tokenizer for Autoregressive Image Generation (Shi, Luo, Ge, Yang, Shan and
Wang, 2024), https://arxiv.org/abs/2412.02692, Section 3.2.

Every token scores every code, ``logits = z Cᵀ``, and takes the code of the largest score. The
token's ``z_q`` is ``onehot_st C`` with ``onehot_st = hard − sg[p] + p`` and ``p = softmax(logits)``:
its value is exactly the chosen code, and its gradient reaches every code and the token through
``p``, so the whole codebook learns at every step (the paper's answer to codebook collapse). The
double quantization loss is ``‖z_q − z‖² + ‖sg[q] − z‖² + β ‖q − sg[z]‖²`` (means), ``q = C[index]``
the hard lookup: the first term through the soft one-hot, the other two VQ's commitment and
codebook terms. The entropy loss of the authors' code, on ``softmax(logits / τ)``, is the mean
per-token entropy minus the entropy of the tokens' mean distribution (this rank's tokens), which
asks each token to be sure of its code and the batch to spread over the codebook. Codes are
``(B, N, 1)`` indices, ``radices == (K,)``.

Memory: the forward walks blocks of codes with a running maximum and log-sum-exp, and the
backwards (``IndexBackprop`` here, the entropies' in ``_softmax.py``) recompute each block's
probabilities, so no step holds more than one block of scores whatever K is
(``vqlab.cluster.block_elements``: 2^24 on a GPU; 2^20 on a CPU, where a block that stays in
cache made a training step of 4096 tokens 1.4 times faster at K = 1024 and 1.7 at K = 16384).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.cluster import block_elements
from vqlab.quantizers._softmax import code_blocks, softmax_entropies
from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry
from vqlab.schema import require


@dataclass(frozen=True)
class IBQConfig(QuantizerConfig):
    """``init``: ``uniform`` U(−1/K, 1/K), the authors' code's (every score starts near 0, so every
    code starts near equally likely), or ``normal`` N(0, 1/dim). ``cosine`` l2-normalises tokens and
    codes before scoring (an option of the authors' code; the preset's, because on the photos the
    plain dot product used 5% of 1024 codes at val L1 0.106, cosine 73% at 0.080: README "Recent
    quantizers").
    ``entropy_weight`` 0 turns the entropy loss off (there IBQ used one code of 1024 on the photos);
    0.1 is LFQ's weight here, where the authors' loss class defaults to 1.0. ``entropy_temperature``
    τ divides the scores inside the entropy loss only (0.01, the authors' code's)."""

    name: str = "ibq"
    codebook_size: int = 1024
    dim: int = 32
    beta: float = 0.25
    init: Literal["uniform", "normal"] = "uniform"
    cosine: bool = False
    entropy_weight: float = 0.1
    entropy_temperature: float = 0.01

    def __post_init__(self):
        require(self.codebook_size >= 2, "codebook_size", f"must be >= 2, got {self.codebook_size}")
        require(self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")
        require(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        require(self.init in ("uniform", "normal"), "init", f"must be uniform or normal, got {self.init!r}")
        require(self.entropy_weight >= 0, "entropy_weight", f"must be >= 0, got {self.entropy_weight}")
        require(self.entropy_temperature > 0, "entropy_temperature", f"must be > 0, got {self.entropy_temperature}")


class IndexBackprop(torch.autograd.Function):
    """``(M, d) z, (K, d) C -> (M, d) C[argmax z Cᵀ]`` whose gradient is that of ``onehot_st C``,
    computed block by block of codes; also returns the chosen ``(M,)`` indices (no gradient).
    For the upstream gradient g: ``∂logit_j = p_j (g·c_j − g·Σ_k p_k c_k)``, plus g on the chosen
    code's row of C."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, codebook: torch.Tensor, elements: int | None):
        elements = elements or block_elements(z.device)  # scores held at once
        m = z.shape[0]
        best = torch.full((m,), -torch.inf, dtype=z.dtype, device=z.device)
        index = torch.zeros(m, dtype=torch.long, device=z.device)
        lse = torch.full((m,), -torch.inf, dtype=z.dtype, device=z.device)
        starts = code_blocks(m, codebook.shape[0], elements)
        for start in starts:
            scores = z @ codebook[start : start + starts.step].T  # (M, w)
            value, position = scores.max(-1)
            better = value > best  # strict: an earlier block keeps a tie, as argmax does
            best = torch.where(better, value, best)
            index = torch.where(better, position + start, index)
            lse = torch.logaddexp(lse, scores.logsumexp(-1))
        ctx.save_for_backward(z, codebook, lse, index)
        ctx.elements = elements
        ctx.mark_non_differentiable(index)
        return codebook[index], index

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _index_grad):
        z, codebook, lse, index = ctx.saved_tensors
        starts = code_blocks(z.shape[0], codebook.shape[0], ctx.elements)

        def probabilities(start: int) -> torch.Tensor:
            return (z @ codebook[start : start + starts.step].T - lse[:, None]).exp()  # (M, w)

        expected = sum(probabilities(s) @ codebook[s : s + starts.step] for s in starts)  # (M, d) Σ p_k c_k
        baseline = (grad * expected).sum(-1, keepdim=True)  # (M, 1) g·Σ p_k c_k
        grad_z = torch.zeros_like(z)
        grad_codebook = torch.zeros_like(codebook).index_add_(0, index, grad)  # the hard one-hot's term
        for start in starts:
            block = codebook[start : start + starts.step]  # (w, d)
            grad_logits = probabilities(start) * (grad @ block.T - baseline)  # (M, w)
            grad_z += grad_logits @ block
            grad_codebook[start : start + starts.step] += grad_logits.T @ z
        return grad_z, grad_codebook, None


@registry.register("ibq", IBQConfig)
class IBQ(Quantizer):
    cfg: IBQConfig
    mean_losses = frozenset({"index", "commitment", "codebook"})

    def __init__(self, cfg: IBQConfig, elements: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.radices = (cfg.codebook_size,)
        self.elements = elements
        k, d = cfg.codebook_size, cfg.dim
        initial = torch.empty(k, d).uniform_(-1 / k, 1 / k) if cfg.init == "uniform" else torch.randn(k, d) / d**0.5
        self.embedding = nn.Parameter(initial)

    def codebook(self) -> torch.Tensor:
        """``(K, D)`` the codes as scored (normalised in cosine mode)."""
        return F.normalize(self.embedding, dim=-1) if self.cfg.cosine else self.embedding

    def latents(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) if self.cfg.cosine else z

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        return self.latents(z.float())

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        flat = self.latents(z.reshape(-1, self.dim))  # (B*N, D)
        codebook = self.codebook()  # (K, D)
        z_q, index = IndexBackprop.apply(flat, codebook, self.elements)  # (B*N, D), (B*N,)
        hard = codebook[index]  # (B*N, D) q, gradient to the chosen codes only
        losses = {
            "index": (z_q - flat).square().mean(),
            "commitment": (hard.detach() - flat).square().mean(),
            "codebook": self.cfg.beta * (hard - flat.detach()).square().mean(),
        }
        if self.cfg.entropy_weight > 0:
            per_token, spread = softmax_entropies(flat, codebook, self.cfg.entropy_temperature, self.elements)
            losses["entropy"] = self.cfg.entropy_weight * (per_token - spread)
        return QuantizerOutput(z_q=z_q.reshape(z.shape), codes=index.reshape(*z.shape[:-1], 1), losses=losses)

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, index = IndexBackprop.apply(self.latents(z.reshape(-1, self.dim)), self.codebook(), self.elements)
        return index.reshape(*z.shape[:-1], 1)

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook()[codes[..., 0]]
