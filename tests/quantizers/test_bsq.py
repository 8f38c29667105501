"""BSQ against its formulas: the sign on the unit sphere, and the entropy terms by brute force over
every code of a small codebook."""

import math

import pytest
import torch

import vqlab


def all_codes(d: int) -> torch.Tensor:
    """``(2^d, d)`` every corner ±1/√d, in the flat-index order of the bits (bit 0 least significant)."""
    bits = (torch.arange(2**d)[:, None] >> torch.arange(d)) & 1  # (2^d, d)
    return torch.where(bits == 1, 1.0, -1.0) / math.sqrt(d)


def test_tokens_go_to_the_sign_of_their_direction_on_the_unit_sphere():
    q = vqlab.quantizers.build("bsq", dim=4)
    z = torch.tensor([[[3.0, -0.5, 0.1, -2.0], [-1e-3, 2e-3, -5.0, 7.0]]])
    out = q(z)
    assert out.codes[0].tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    torch.testing.assert_close(out.z_q, torch.where(z > 0, 0.5, -0.5))  # 1/√4
    torch.testing.assert_close(out.z_q.norm(dim=-1), torch.ones(1, 2))
    torch.testing.assert_close(q.relaxed(z), z / z.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("group_bits", [1, 2, 4])
def test_the_entropies_are_the_papers_by_brute_force_over_every_code(group_bits):
    """Per-sample: E[H(softmax(−‖u − c‖²/τ))] over all 2^d codes, exactly. Codebook: the sum over
    groups of bits of the entropy of the batch-mean distribution of each group's codes, which is
    the joint entropy when one group holds every bit and bounds it otherwise."""
    d, tau = 4, 0.3
    q = vqlab.quantizers.build("bsq", dim=d, entropy_temperature=tau, group_bits=group_bits)
    u = torch.nn.functional.normalize(torch.randn(64, d, generator=torch.Generator().manual_seed(0)), dim=-1)
    sample, codebook = q.entropies(u)
    p = torch.softmax(-torch.cdist(u, all_codes(d)).square() / tau, dim=-1)  # (T, 2^d)
    per_token = torch.special.entr(p).sum(-1).mean()
    torch.testing.assert_close(sample, per_token)
    digits = (torch.arange(2**d)[:, None] >> torch.arange(d)) & 1  # (2^d, d)
    expected = 0.0
    for start in range(0, d, group_bits):
        group = digits[:, start : start + group_bits] @ (2 ** torch.arange(group_bits))  # each code's group value
        marginal = torch.stack([p[:, group == v].sum(-1) for v in range(2**group_bits)], -1)  # (T, 2^g)
        expected += torch.special.entr(marginal.mean(0)).sum()
    torch.testing.assert_close(codebook, expected)
    joint = torch.special.entr(p.mean(0)).sum()
    assert codebook >= joint - 1e-6
    if group_bits == d:
        torch.testing.assert_close(codebook, joint)


def test_the_per_bit_codebook_entropy_misses_bits_that_move_together_and_the_joint_one_sees_them():
    """Half the tokens have every bit +, half every bit −: each bit is balanced (the per-bit form is
    at its maximum, d log 2) while only two codes are used (the joint form is log 2)."""
    d = 6
    u = torch.nn.functional.normalize(torch.cat([torch.ones(32, d), -torch.ones(32, d)]), dim=-1)
    per_bit = vqlab.quantizers.build("bsq", dim=d, entropy_temperature=0.01, group_bits=1).entropies(u)[1]
    joint = vqlab.quantizers.build("bsq", dim=d, entropy_temperature=0.01, group_bits=d).entropies(u)[1]
    torch.testing.assert_close(per_bit, torch.tensor(d * math.log(2)))
    torch.testing.assert_close(joint, torch.tensor(math.log(2)))


def test_the_entropy_loss_pushes_tokens_apart_and_commits_them():
    """Identical tokens: the codebook term rewards spreading them, so its gradient is not zero;
    the loss has exactly the configured parts."""
    q = vqlab.quantizers.build("bsq", dim=6, entropy_weight=0.5, commitment_weight=0.25)
    z = (torch.ones(1, 8, 6) + 0.01 * torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(1))).requires_grad_()
    out = q(z)
    assert set(out.losses) == {"entropy", "commitment"}
    out.losses["entropy"].backward()
    assert z.grad.abs().sum() > 0
    assert set(vqlab.quantizers.build("bsq", dim=6, entropy_weight=0, commitment_weight=0)(z).losses) == set()


@pytest.mark.parametrize(
    ("key", "value"), [("dim", 1), ("entropy_temperature", 0.0), ("entropy_weight", -1.0), ("group_bits", 0)]
)
def test_bad_options_are_config_errors_naming_the_key(key, value):
    from vqlab.schema import ConfigError

    with pytest.raises(ConfigError, match=key):
        vqlab.quantizers.build("bsq", **{key: value})


def test_saturated_bits_at_a_low_temperature_keep_a_finite_gradient():
    """τ = 0.01: every token's first bit is surely +, so its batch-mean probability rounds to 1,
    where the Bernoulli entropy's derivative is infinite (this was a NaN at the first step)."""
    q = vqlab.quantizers.build("bsq", dim=10, entropy_temperature=0.01)
    z = torch.randn(1, 64, 10, generator=torch.Generator().manual_seed(2))
    z[..., 0] = 5.0
    z.requires_grad_()
    loss = q(z).losses["entropy"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
