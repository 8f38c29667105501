"""Radix ("FSQ-1"): one bounded, rounded scalar and its mixed-radix digits, checked by hand."""

import math

import pytest
import torch

import vqlab
from vqlab.codes import digits_to_index
from vqlab.schema import ConfigError


def build(**options):
    torch.manual_seed(0)
    return vqlab.quantizers.build("radix", **options)


def set_first_channel_projection(q):
    """The scalar becomes z[..., 0]: the by-hand formulas need no matrix product."""
    with torch.no_grad():
        q.project.weight.zero_()
        q.project.weight[0, 0] = 1.0
        q.project.bias.zero_()


def test_integer_and_digits_by_hand():
    radices = (3, 4, 5)  # M = 60
    q = build(radices=list(radices), dim=2)
    set_first_channel_projection(q)
    values = [-9.0, -2.2, -0.7, -0.05, 0.0, 0.3, 0.9, 1.7, 3.1, 9.0]
    z = torch.tensor([[x, 123.0] for x in values])[None]  # (1, 10, 2); channel 1 is ignored
    out = q(z)
    w, b = q.embed.weight[:, 0].tolist(), q.embed.bias.tolist()
    for n, x in enumerate(values):
        m = round(1 / (1 + math.exp(-x)) * 59)
        digits = [m % 3, (m // 3) % 4, m // 12]
        assert out.codes[0, n].tolist() == digits, x
        assert digits[0] + 3 * digits[1] + 12 * digits[2] == m  # sum(digit_i * prod(radices[:i]))
        t = 2 * m / 59 - 1
        assert out.z_q[0, n].tolist() == pytest.approx([t * wi + bi for wi, bi in zip(w, b, strict=True)], abs=1e-6)
    assert out.codes[0, 0].tolist() == [0, 0, 0] and out.codes[0, -1].tolist() == [2, 3, 4]  # the two ends


def test_digits_in_range_and_every_integer_reachable():
    q = build(radices=[4, 3], dim=1)
    set_first_channel_projection(q)
    codes = q.encode(torch.linspace(-8, 8, 2001)[None, :, None])  # (1, 2001, 2)
    assert (codes >= 0).all() and (codes < torch.tensor([4, 3])).all()
    m = codes[..., 0] + 4 * codes[..., 1]
    assert sorted(m.unique().tolist()) == list(range(12))
    assert (m.diff() >= 0).all()  # the integer grows with the scalar: digit 0 cycles fastest


def reached_integers(q, m: torch.Tensor) -> torch.Tensor:
    """The integers that inputs aimed at each of ``m`` (and at the fp32 neighbours of each aim) reach."""
    aims = torch.logit(m.double().clamp(0.25, q.top - 0.25) / q.top).float()  # sigmoid(aim) * (M - 1) ~ m
    nudged = [aims]
    for direction in (float("inf"), -float("inf")):
        step = aims
        for _ in range(2):  # rounding ties can need the next representable input
            step = torch.nextafter(step, torch.tensor(direction))
            nudged.append(step)
    codes = q.encode(torch.cat(nudged)[None, :, None])  # (1, 5 * len(m), G)
    return torch.unique(digits_to_index(codes, q.radices))


def test_every_integer_is_reachable_at_the_largest_allowed_size():
    q = build(radices=[2048, 2048], dim=1).eval()  # 2**22, the bound
    set_first_channel_projection(q)
    m = q.codebook_size
    # the sigmoid is coarsest near 1 (fp32 steps of 2**-24): the top of the range, and the bottom
    for chunk in (torch.arange(m - 2**17, m), torch.arange(2**12)):
        assert torch.equal(reached_integers(q, chunk), chunk)


def test_straight_through_gradient_reaches_the_input():
    q = build(radices=[8, 8], dim=3)
    z = torch.randn(2, 5, 3, requires_grad=True)
    q(z).z_q.sum().backward()
    s = torch.sigmoid(q.project(z.detach()))  # (2, 5, 1)
    # d z_q.sum / d scalar = sum(w) * d t / d rounded * d rounded / d scalar = sum(w) * 2 / (M-1) * s(1-s) (M-1)
    expected = q.embed.weight.sum() * 2 * s * (1 - s) * q.project.weight[0]
    torch.testing.assert_close(z.grad, expected.detach())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())  # both maps learn


def test_exact_round_trip_in_eval():
    q = build(radices=[32, 32], dim=16).eval()
    z = torch.randn(3, 7, 16) * 2
    out = q(z)
    assert torch.equal(q.encode(z), out.codes)
    assert torch.equal(q.decode(out.codes), out.z_q)
    assert torch.equal(q.decode(out.codes.reshape(-1, 2)), out.z_q.reshape(-1, 16))
    assert torch.equal(q.decode(out.codes[2, 3]), out.z_q[2, 3])  # a single code (G,)


def test_bad_options_are_config_errors():
    for options, key in [
        ({"radices": [2048, 2049]}, "radices"),  # prod > 2**22
        ({"radices": [8, 1]}, "radices"),
        ({"radices": []}, "radices"),
        ({"dim": 0}, "dim"),
    ]:
        with pytest.raises(ConfigError) as err:
            build(**options)
        assert err.value.key == key, options
    assert build(radices=[2048, 2048], dim=1).codebook_size == 2**22  # the largest size is allowed


def test_preset_loads():
    cfg = vqlab.config.load("radix")
    q = vqlab.quantizers.build(cfg.quantizer)
    assert q.radices == (32, 32) and q.codebook_size == 1024
    assert vqlab.config.from_yaml(vqlab.config.to_yaml(cfg)) == cfg
