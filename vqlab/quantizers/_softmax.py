"""The softmax of scores against every code, held one block of codes at a time.

``scores = z Cᵀ / τ`` for ``(M, d)`` tokens and ``(K, d)`` codes would be an ``(M, K)`` matrix;
these functions walk blocks of codes so that no step holds more than a block of them
(``vqlab.cluster.block_elements`` of the device unless given: a block that stays in a CPU's cache
is faster there), and their backwards recompute each block instead of saving it.
Used by IBQ (dot-product scores) and VQ's entropy loss (negative squared distances).
"""

from __future__ import annotations

import torch

from vqlab.cluster import block_elements


def code_blocks(tokens: int, codes: int, elements: int) -> range:
    """Starts of blocks of codes such that a block of scores for every token holds at most
    ``elements`` floats (at least one code per block)."""
    return range(0, codes, min(codes, max(1, elements // max(tokens, 1))))


def log_normalizer(z: torch.Tensor, codebook: torch.Tensor, temperature: float, starts: range) -> torch.Tensor:
    """``(M,)`` logsumexp over codes of ``z Cᵀ / τ``, one block of codes at a time."""
    lse = torch.full((z.shape[0],), -torch.inf, dtype=z.dtype, device=z.device)
    for start in starts:
        lse = torch.logaddexp(lse, ((z @ codebook[start : start + starts.step].T) / temperature).logsumexp(-1))
    return lse


class SoftmaxEntropies(torch.autograd.Function):
    """``(M, d) z, (K, d) C`` -> the mean per-token entropy of ``p = softmax(z Cᵀ / τ)`` and the
    entropy of the mean ``p̄`` over tokens, computed block by block of codes. With ``l`` the scaled
    scores and ``H_m`` token m's entropy: ``∂H_m/∂l_mj = −p_mj (log p_mj + H_m)``, and with
    ``a_j = −(log p̄_j + 1)``, ``∂H(p̄)/∂l_mj = p_mj (a_j − Σ_k p_mk a_k) / M``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, codebook: torch.Tensor, temperature: float, elements: int):
        m = z.shape[0]
        starts = code_blocks(m, codebook.shape[0], elements)
        lse = log_normalizer(z, codebook, temperature, starts)  # (M,)
        expected_logit = torch.zeros_like(lse)  # (M,) Σ_k p_k l_k
        mean_p = torch.empty(codebook.shape[0], dtype=z.dtype, device=z.device)
        for start in starts:
            logits = (z @ codebook[start : start + starts.step].T) / temperature  # (M, w)
            p = (logits - lse[:, None]).exp()
            expected_logit += (p * logits).sum(-1)
            mean_p[start : start + starts.step] = p.mean(0)
        token_entropy = lse - expected_logit  # (M,)
        # The clamp keeps log p̄ finite for codes whose mean probability underflows to zero.
        log_mean_p = mean_p.clamp_min(1e-30).log()
        ctx.save_for_backward(z, codebook, lse, token_entropy, log_mean_p)
        ctx.temperature, ctx.elements = temperature, elements
        return token_entropy.mean(), -(mean_p * log_mean_p).sum()

    @staticmethod
    def backward(ctx, grad_sample: torch.Tensor, grad_codebook_entropy: torch.Tensor):
        z, codebook, lse, token_entropy, log_mean_p = ctx.saved_tensors
        m, temperature = z.shape[0], ctx.temperature
        starts = code_blocks(m, codebook.shape[0], ctx.elements)
        a = -(log_mean_p + 1)  # (K,)

        def block(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            logits = (z @ codebook[start : start + starts.step].T) / temperature  # (M, w)
            return logits, (logits - lse[:, None]).exp()

        baseline = sum(block(s)[1] @ a[s : s + starts.step] for s in starts)  # (M,) Σ_k p_mk a_k
        grad_z = torch.zeros_like(z)
        grad_c = torch.zeros_like(codebook)
        for start in starts:
            logits, p = block(start)
            log_p = logits - lse[:, None]
            per_token = -(log_p + token_entropy[:, None])
            spread = a[start : start + starts.step] - baseline[:, None]
            grad_logits = p * (grad_sample * per_token + grad_codebook_entropy * spread) / (m * temperature)
            grad_z += grad_logits @ codebook[start : start + starts.step]
            grad_c[start : start + starts.step] = grad_logits.T @ z
        return grad_z, grad_c, None, None


def softmax_entropies(
    z: torch.Tensor, codebook: torch.Tensor, temperature: float, elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token entropy of ``softmax(z Cᵀ / τ)`` and the entropy of its mean over tokens."""
    return SoftmaxEntropies.apply(z, codebook, temperature, elements or block_elements(z.device))


def distance_softmax_entropies(
    z: torch.Tensor, codebook: torch.Tensor, temperature: float, elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two entropies for ``softmax(−‖z − c‖² / τ)``. A token's ``‖z‖²`` shifts all its
    scores equally, which a softmax ignores, so the scores are ``2 z·c − ‖c‖²``: a dot product of
    ``[2z, 1]`` with ``[c, −‖c‖²]``, which the blocked function takes as it is."""
    tokens = torch.cat([2 * z, z.new_ones(z.shape[0], 1)], dim=-1)  # (M, d + 1)
    codes = torch.cat([codebook, -codebook.square().sum(-1, keepdim=True)], dim=-1)  # (K, d + 1)
    return softmax_entropies(tokens, codes, temperature, elements)
