"""Gumbel-softmax VQ against its formulas, computed here from the layer's weights."""

import math

import pytest
import torch

import vqlab


def build(**options):
    torch.manual_seed(0)
    return vqlab.quantizers.build("gumbel", **{"codebook_size": 16, "dim": 8, **options})


def tokens(q, seed=0, batch=3, n=5):
    return torch.randn(batch, n, q.dim, generator=torch.Generator().manual_seed(seed))


def logits_of(q, z):
    return z @ q.to_logits.weight.detach().T + q.to_logits.bias.detach()  # (B, N, K)


def test_kl_to_uniform_by_hand():
    q = build(kl_weight=0.7)
    z = tokens(q)
    logits = logits_of(q, z).double()
    expected = 0.0
    for row in logits.reshape(-1, 16):
        p = torch.softmax(row, dim=0).tolist()
        expected += sum(pk * math.log(pk / (1 / 16)) for pk in p)
    expected /= 15
    out = q(z)
    assert out.stats["kl_to_uniform"].item() == pytest.approx(expected, rel=1e-5)
    assert out.losses["kl"].item() == pytest.approx(0.7 * expected, rel=1e-5)
    assert "kl" not in build(kl_weight=0.0)(z).losses


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [2.0, 2.0, 2.0, 2.0, 2.0]),
        ("linear", [2.0, 1.625, 1.25, 0.5, 0.5]),
        ("cosine", [2.0, 0.5 + 1.5 * (1 + math.cos(math.pi / 4)) / 2, 1.25, 0.5, 0.5]),
    ],
)
def test_temperature_schedule(schedule, expected):
    q = build(temperature=2.0, temperature_end=0.5, schedule=schedule)
    assert q.temperature == 2.0
    z = tokens(q)
    for step, tau in zip([0, 25, 50, 100, 150], expected, strict=True):
        q.set_step(step, 101)  # steps 0..100: the last step runs at temperature_end
        assert q.temperature == pytest.approx(tau, rel=1e-12), step
        assert q(z).stats["temperature"].item() == pytest.approx(tau, rel=1e-6)


def test_hard_forward_is_an_exact_codebook_row_and_the_gradient_reaches_the_logits():
    q = build(hard=True, kl_weight=0.0).train()
    z = tokens(q).requires_grad_()
    out = q(z)
    codebook = q.codebook.weight.detach()
    for row in out.z_q.detach().reshape(-1, 8):
        assert (codebook == row).all(dim=-1).sum() >= 1
    (out.z_q * torch.randn_like(out.z_q)).sum().backward()
    assert q.to_logits.weight.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0


def test_soft_sample_follows_the_temperature():
    # a huge temperature flattens the relaxed sample to the uniform mix of all rows
    q = build(temperature=1e6, schedule="constant").train()
    z = tokens(q)
    torch.testing.assert_close(q(z).z_q, q.codebook.weight.detach().mean(0).expand(3, 5, 8), atol=1e-4, rtol=0)
    # a tiny one makes it (numerically) one-hot
    q = build(temperature=1e-6, schedule="constant").train()
    z_q = q(z).z_q.detach().reshape(-1, 8)
    distance = torch.cdist(z_q, q.codebook.weight.detach()).min(dim=-1).values
    assert (distance < 1e-5).all()


def test_training_samples_are_noisy_but_codes_are_the_argmax():
    q = build().train()
    z = tokens(q)
    first, second = q(z), q(z)
    assert not torch.equal(first.z_q, second.z_q)
    expected = logits_of(q, z).argmax(dim=-1, keepdim=True)
    assert torch.equal(first.codes, expected) and torch.equal(second.codes, expected)


def test_eval_is_deterministic_and_decode_of_encode_is_z_q():
    q = build().eval()
    z = tokens(q, seed=1)
    first, second = q(z), q(z)
    assert torch.equal(first.z_q, second.z_q)
    codes = q.encode(z)
    assert torch.equal(codes, logits_of(q, z).argmax(dim=-1, keepdim=True))
    assert torch.equal(q.decode(codes), first.z_q)
    assert torch.equal(first.z_q, q.codebook.weight.detach()[codes[..., 0]])
    assert torch.equal(q.decode(codes.reshape(15, 1)), first.z_q.reshape(15, 8))
    assert q.radices == (16,) and q.codebook_size == 16


def test_gradient_reaches_the_input_in_soft_mode():
    q = build(kl_weight=0.0).train()
    z = tokens(q).requires_grad_()
    q(z).z_q.sum().backward()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("codebook_size", 1),
        ("dim", 0),
        ("temperature", 0.0),
        ("temperature_end", -1.0),
        ("schedule", "exponential"),
        ("kl_weight", -0.1),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(key, value):
    with pytest.raises(vqlab.schema.ConfigError, match=key) as info:
        vqlab.quantizers.build("gumbel", **{key: value})
    assert info.value.key == key
