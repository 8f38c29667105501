"""Helpers shared by the quantizer tests."""

import torch


def tokens(q, seed=0, batch=2, n=8):
    """``(batch, n, q.dim)`` Gaussian tokens with std 1.5, from a seeded generator."""
    return torch.randn(batch, n, q.dim, generator=torch.Generator().manual_seed(seed)) * 1.5


def record_part_calls(q):
    """[(input, output)] of every call of a composite's parts, in order."""
    calls = []
    for part in q.parts:
        part.register_forward_hook(lambda module, args, out: calls.append((args[0], out)))
    return calls


def hooks_seen_by_parts(q):
    """Call ``set_step(5, 10)`` and ``on_optimizer_step()`` on composite ``q``; return what its
    parts received, as ``(hook, id(part), ...)`` tuples in order."""
    seen = []
    for part in q.parts:
        part.set_step = lambda step, total, part=part: seen.append(("set_step", id(part), step, total))
        part.on_optimizer_step = lambda part=part: seen.append(("on_optimizer_step", id(part)))
    q.set_step(5, 10)
    q.on_optimizer_step()
    return seen


def dense_entropies(z: torch.Tensor, codebook: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token entropy of softmax(z Cᵀ / τ) and the entropy of its mean, as written, over
    the full (M, K) matrix: the reference for the blocked functions."""
    log_p = torch.log_softmax(z @ codebook.T / temperature, dim=-1)
    p = log_p.exp()
    mean_p = p.mean(0)
    return -(p * log_p).sum(-1).mean(), -(mean_p * mean_p.log()).sum()
