"""FSQ and SFSQ against their formulas, computed here with Python's math module, scalar by scalar."""

import math

import pytest
import torch

import vqlab


def fsq_formula(z: float, level: int, eps: float = 1e-3) -> tuple[float, int]:
    """Appendix A.1 of arXiv 2309.15505 for one scalar: (quantized value in [-1, 1], digit)."""
    half_l = (level - 1) * (1 - eps) / 2
    offset = 0.0 if level % 2 == 1 else 0.5
    shift = math.tan(offset / half_l)
    bounded = math.tanh(z + shift) * half_l - offset
    rounded = round(bounded)
    half_width = level // 2
    return rounded / half_width, rounded + half_width


def sfsq_formula(z: float, level: int) -> tuple[float, int]:
    digit = round(1 / (1 + math.exp(-z)) * (level - 1))
    return digit / (level - 1), digit


Z = torch.tensor([-6.0, -1.3, -0.61, -0.2, -0.01, 0.0, 0.05, 0.33, 0.7, 1.1, 2.5, 9.0])


@pytest.mark.parametrize(
    ("name", "formula", "levels"),
    [("fsq", fsq_formula, (3, 4, 5, 8)), ("sfsq", sfsq_formula, (3, 4, 5, 8)), ("fsq", fsq_formula, (2, 7, 6))],
)
def test_matches_formula(name, formula, levels):
    q = vqlab.quantizers.build(name, levels=list(levels))
    z = Z[:, None].repeat(1, len(levels))[None]  # (1, 12, d): every value through every level
    out = q(z)
    for n, value in enumerate(Z.tolist()):
        for d, level in enumerate(levels):
            expected_value, expected_digit = formula(value, level)
            assert out.z_q[0, n, d].item() == pytest.approx(expected_value, abs=1e-6), (value, level)
            assert out.codes[0, n, d].item() == expected_digit, (value, level)


def test_fsq_grids_by_hand():
    q = vqlab.quantizers.build("fsq", levels=[3, 4])
    out = q(torch.tensor([[[10.0, 10.0], [-10.0, -10.0], [0.0, 0.0]]]))
    # odd L=3: {-1, 0, 1}; even L=4: {-1, -0.5, 0, 0.5} (one more step below zero than above)
    assert out.z_q[0].tolist() == [[1.0, 0.5], [-1.0, -1.0], [0.0, 0.0]]
    assert out.codes[0].tolist() == [[2, 3], [0, 0], [1, 2]]


def test_sfsq_grid_by_hand():
    q = vqlab.quantizers.build("sfsq", levels=[3, 5])
    out = q(torch.tensor([[[10.0, 10.0], [-10.0, -10.0], [0.0, 0.0]]]))
    assert out.z_q[0].tolist() == [[1.0, 1.0], [0.0, 0.0], [0.5, 0.5]]
    assert out.codes[0].tolist() == [[2, 4], [0, 0], [1, 2]]


@pytest.mark.parametrize("name", ["fsq", "sfsq"])
def test_every_code_is_reachable_and_decodes_to_its_grid_point(name):
    levels = (8, 5, 2)
    q = vqlab.quantizers.build(name, levels=list(levels)).eval()
    z = torch.linspace(-8, 8, 4001)[None, :, None].repeat(1, 1, 3)
    codes = q.encode(z)
    for d, level in enumerate(levels):
        assert sorted(codes[0, :, d].unique().tolist()) == list(range(level))
    assert torch.equal(q.decode(codes), q(z).z_q)


@pytest.mark.parametrize("name", ["fsq", "sfsq"])
def test_straight_through_gradient_is_the_bound_derivative(name):
    q = vqlab.quantizers.build(name, levels=[5, 4])
    z = torch.randn(2, 7, 2, requires_grad=True)
    q(z).z_q.sum().backward()
    if name == "fsq":
        half_l, shift, half_width = q.half_l, q.shift, q.half_width
        expected = (1 - torch.tanh(z.detach() + shift) ** 2) * half_l / half_width
    else:
        s = torch.sigmoid(z.detach())
        expected = s * (1 - s)
    torch.testing.assert_close(z.grad, expected)


@pytest.mark.parametrize("levels", [(8, 5), (3, 16, 2), (255,)])
def test_every_level_is_reachable_at_the_largest_allowed_eps(levels):
    largest = 1 / (2 * (max(levels) - 1))
    q = vqlab.quantizers.build("fsq", levels=list(levels), eps=largest).eval()
    z = torch.linspace(-20, 20, 20001)[None, :, None].repeat(1, 1, len(levels))
    codes = q.encode(z)
    for d, level in enumerate(levels):
        assert sorted(codes[0, :, d].unique().tolist()) == list(range(level)), level
    with pytest.raises(vqlab.schema.ConfigError, match="eps") as err:
        vqlab.quantizers.build("fsq", levels=list(levels), eps=largest * 1.01)
    assert err.value.key == "eps"


def test_eps_that_hides_outer_levels_is_a_config_error():
    with pytest.raises(vqlab.schema.ConfigError, match="unreachable") as err:
        vqlab.quantizers.build("fsq", levels=[8, 5], eps=0.2)  # would reach 6 of the 8 levels
    assert err.value.key == "eps"


def test_bad_levels_are_config_errors():
    with pytest.raises(vqlab.schema.ConfigError, match="levels"):
        vqlab.quantizers.build("fsq", levels=[8, 1])
    with pytest.raises(vqlab.schema.ConfigError, match="levels"):
        vqlab.quantizers.build("sfsq", levels=[])
    with pytest.raises(vqlab.schema.ConfigError, match="levels"):
        vqlab.quantizers.build("fsq", levels="8-5-5")
