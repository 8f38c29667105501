"""LFQ against its formulas, computed here by brute force over every code of the implicit codebook."""

import itertools
import math

import pytest
import torch

import vqlab
from vqlab.codes import digits_to_index


def all_codes(bits: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every code as (flat index order) digits ``(2^bits, bits)`` and values ``±scale``; digit 0 varies fastest."""
    digits = torch.tensor([list(reversed(code)) for code in itertools.product([0, 1], repeat=bits)])
    return digits, (2.0 * digits.double() - 1.0) * scale


def brute_force(z: torch.Tensor, scale: float, tau: float) -> torch.Tensor:
    """``(T, d)`` tokens -> ``(T, 2^d)`` p(q|z) ∝ exp(-||z - q||^2 / tau), in float64."""
    _, values = all_codes(z.shape[-1], scale)
    distance = (z.double()[:, None, :] - values[None]).square().sum(-1)  # (T, 2^d)
    return torch.softmax(-distance / tau, dim=-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)


def tokens(d: int, seed: int = 0, batch: int = 3, n: int = 7) -> torch.Tensor:
    return torch.randn(batch, n, d, generator=torch.Generator().manual_seed(seed)) * 0.8


def test_entropy_loss_is_the_brute_force_formula_over_all_codes():
    scale, tau, weight, gamma = 0.7, 1.3, 0.3, 0.6
    q = vqlab.quantizers.build(
        "lfq",
        dim=4,
        scale=scale,
        entropy_temperature=tau,
        entropy_weight=weight,
        diversity_gamma=gamma,
        commitment_weight=0.0,
        group_bits=4,
    )
    z = tokens(4)
    out = q(z)
    p = brute_force(z.reshape(-1, 4), scale, tau)  # (T, 16)
    sample_entropy = entropy(p).mean().item()
    codebook_entropy = entropy(p.mean(0)).item()
    assert out.stats["sample_entropy"].item() == pytest.approx(sample_entropy, rel=1e-5)
    assert out.stats["codebook_entropy"].item() == pytest.approx(codebook_entropy, rel=1e-5)
    expected = weight * (sample_entropy - gamma * codebook_entropy)
    assert out.losses["entropy"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert "commitment" not in out.losses


@pytest.mark.parametrize("group_bits", [1, 2, 5])
def test_per_bit_sample_entropy_equals_the_joint_one(group_bits):
    q = vqlab.quantizers.build("lfq", dim=5, scale=1.0, entropy_temperature=2.0, group_bits=group_bits)
    z = tokens(5, seed=1)
    expected = entropy(brute_force(z.reshape(-1, 5), 1.0, 2.0)).mean().item()
    assert q(z).stats["sample_entropy"].item() == pytest.approx(expected, rel=1e-6)


def test_grouped_codebook_entropy_is_the_sum_of_group_marginal_entropies():
    scale, tau, weight, gamma = 1.0, 1.5, 0.2, 1.0
    q = vqlab.quantizers.build(
        "lfq",
        dim=5,
        scale=scale,
        entropy_temperature=tau,
        entropy_weight=weight,
        diversity_gamma=gamma,
        group_bits=2,
    )
    z = tokens(5, seed=2)
    p = brute_force(z.reshape(-1, 5), scale, tau)  # (T, 32)
    digits, _ = all_codes(5, scale)
    expected = 0.0
    for group in ([0, 1], [2, 3], [4]):  # 2 + 2 + the smaller last group
        # marginal over the group's bits: add up the joint mass of the codes sharing those digits
        group_index = sum(digits[:, bit] << i for i, bit in enumerate(group))  # (32,)
        marginal = torch.zeros(p.shape[0], 2 ** len(group), dtype=p.dtype).index_add_(1, group_index, p)
        expected += entropy(marginal.mean(0)).item()
    out = q(z)
    assert out.stats["codebook_entropy"].item() == pytest.approx(expected, rel=1e-5)
    sample_entropy = entropy(p).mean().item()
    assert out.losses["entropy"].item() == pytest.approx(weight * (sample_entropy - gamma * expected), rel=1e-5)
    # the factorised form bounds the joint entropy from above
    assert expected >= entropy(p.mean(0)).item() - 1e-9


def test_commitment_loss_by_hand():
    q = vqlab.quantizers.build("lfq", dim=3, scale=0.5, commitment_weight=0.4, entropy_weight=0.0, group_bits=3)
    z = torch.tensor([[[0.2, -1.0, 0.0], [2.0, 0.5, -0.25]]])
    # q = [[0.5, -0.5, -0.5], [0.5, 0.5, -0.5]]
    squared = [0.3**2, 0.5**2, 0.5**2, 1.5**2, 0.0, 0.25**2]
    out = q(z)
    assert out.losses["commitment"].item() == pytest.approx(0.4 * sum(squared) / 6, rel=1e-6)
    assert "entropy" not in out.losses


def test_codes_are_sign_bits_with_digit_0_least_significant():
    q = vqlab.quantizers.build("lfq", dim=5, scale=2.0, group_bits=5)
    z = torch.tensor([[[0.3, -1.0, 2.0, 0.0, -0.1], [-0.3, 1.0, -2.0, 1e-6, 0.1]]])
    out = q(z)
    assert out.codes[0].tolist() == [[1, 0, 1, 0, 0], [0, 1, 0, 1, 1]]  # exactly 0 is the negative code
    assert digits_to_index(out.codes, q.radices)[0].tolist() == [1 + 4, 2 + 8 + 16]
    assert out.z_q[0].tolist() == [[2.0, -2.0, 2.0, -2.0, -2.0], [-2.0, 2.0, -2.0, 2.0, 2.0]]
    assert q.radices == (2,) * 5 and q.codebook_size == 32


def test_decode_inverts_encode_for_any_leading_shape():
    q = vqlab.quantizers.build("lfq", dim=6, scale=0.3).eval()
    z = tokens(6, seed=3)
    out = q(z)
    assert torch.equal(q.decode(q.encode(z)), out.z_q)
    assert torch.equal(q.decode(out.codes.reshape(3, 7, 1, 6)), out.z_q.reshape(3, 7, 1, 6))
    assert torch.isin(q.decode(out.codes), torch.tensor([-0.3, 0.3])).all()


def test_gradients_reach_the_input():
    q = vqlab.quantizers.build("lfq", dim=4, entropy_weight=0.0, commitment_weight=0.0, group_bits=4)
    z = tokens(4).requires_grad_()
    q(z).z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: identity

    q = vqlab.quantizers.build("lfq", dim=4, entropy_temperature=1.0, commitment_weight=0.0, group_bits=2)
    z = tokens(4).requires_grad_()
    q(z).losses["entropy"].backward()
    assert z.grad.abs().sum() > 0


def test_sharp_temperature_keeps_gradients_finite():
    # at the default tau the soft assignment underflows to exact zeros for far-from-zero tokens
    q = vqlab.quantizers.build("lfq")
    z = (tokens(10, seed=4) * 20).requires_grad_()
    out = q(z)
    sum(out.losses.values()).backward()
    assert torch.isfinite(z.grad).all()
    assert out.stats["codebook_entropy"] <= math.log(2**10) + 1e-4


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dim", 63),
        ("dim", 0),
        ("scale", 0.0),
        ("entropy_weight", -0.1),
        ("commitment_weight", -1.0),
        ("diversity_gamma", -1.0),
        ("entropy_temperature", 0.0),
        ("group_bits", 0),
        ("group_bits", 17),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(key, value):
    with pytest.raises(vqlab.schema.ConfigError, match=key) as info:
        vqlab.quantizers.build("lfq", **{key: value})
    assert info.value.key == key


def test_62_bits_is_allowed():
    q = vqlab.quantizers.build("lfq", dim=62)
    assert digits_to_index(q.encode(torch.ones(1, 1, 62)), q.radices).item() == 2**62 - 1
