"""The blocked softmax entropies against the dense formula: values and gradients, for dot-product
and distance scores, with one code per block, several, and all at once."""

import pytest
import torch

from vqlab.quantizers._softmax import code_blocks, distance_softmax_entropies, softmax_entropies

from .helpers import dense_entropies

BLOCKS = [40, 1000, 10**8]  # 40 tokens: one code per block, 25 codes per block, every code at once


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(40, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(50, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, generator=generator, dtype=torch.float64)  # the two terms weighted apart
    return z, codebook, weights


def values_and_gradients(function, z, codebook, weights):
    z.grad = codebook.grad = None
    entropies = function(z, codebook)
    (weights[0] * entropies[0] + weights[1] * entropies[1]).backward()
    return torch.stack(entropies).detach(), z.grad.clone(), codebook.grad.clone()


@pytest.mark.parametrize("elements", BLOCKS)
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_dot_product_entropies_and_gradients_equal_the_dense_formula(elements, temperature):
    z, codebook, weights = inputs(2)
    expected = values_and_gradients(lambda a, b: dense_entropies(a, b, temperature), z, codebook, weights)
    blocked = values_and_gradients(lambda a, b: softmax_entropies(a, b, temperature, elements), z, codebook, weights)
    for got, want in zip(blocked, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("elements", BLOCKS)
def test_distance_entropies_and_gradients_equal_the_softmax_of_negative_squared_distances(elements):
    z, codebook, weights = inputs(3)

    def dense(a, b):
        log_p = torch.log_softmax(-torch.cdist(a, b).square() / 0.5, dim=-1)
        mean_p = log_p.exp().mean(0)
        return -(log_p.exp() * log_p).sum(-1).mean(), -(mean_p * mean_p.log()).sum()

    expected = values_and_gradients(dense, z, codebook, weights)
    blocked = values_and_gradients(lambda a, b: distance_softmax_entropies(a, b, 0.5, elements), z, codebook, weights)
    for got, want in zip(blocked, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_a_code_whose_mean_probability_underflows_keeps_finite_gradients():
    z = torch.tensor([[1.0, 0.0], [0.9, 0.1]], requires_grad=True)
    codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)  # code 1 gets p = e^-200 at τ = 0.01
    per_token, spread = softmax_entropies(z, codebook, 0.01)
    (per_token - spread).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(codebook.grad).all()


@pytest.mark.parametrize(("tokens", "codes", "elements"), [(4, 7, 8), (1000, 3, 10), (3, 5, 1000), (0, 4, 8)])
def test_code_blocks_cover_every_code_within_the_budget(tokens, codes, elements):
    starts = code_blocks(tokens, codes, elements)
    covered = [c for s in starts for c in range(s, min(s + starts.step, codes))]
    assert covered == list(range(codes))
    assert starts.step == 1 or tokens * starts.step <= elements
