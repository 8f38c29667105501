import math

import pytest
import torch

from vqlab.codes import codebook_size, digits_to_index, fits_int64, index_to_digits, perplexity


def test_digit_zero_is_least_significant():
    radices = (8, 5, 3)
    assert digits_to_index(torch.tensor([1, 0, 0]), radices).item() == 1
    assert digits_to_index(torch.tensor([0, 1, 0]), radices).item() == 8
    assert digits_to_index(torch.tensor([0, 0, 1]), radices).item() == 40
    assert digits_to_index(torch.tensor([7, 4, 2]), radices).item() == codebook_size(radices) - 1 == 119


def test_round_trip_over_every_code():
    radices = (4, 3, 5, 2)
    index = torch.arange(codebook_size(radices))
    digits = index_to_digits(index, radices)
    assert digits.dtype == torch.int64
    assert all((digits[:, i] < r).all() for i, r in enumerate(radices))
    assert torch.equal(digits_to_index(digits, radices), index)
    assert len({tuple(d) for d in digits.tolist()}) == len(index)


def test_any_leading_shape():
    radices = (6, 7)
    digits = torch.stack([torch.randint(0, 6, (2, 3, 4)), torch.randint(0, 7, (2, 3, 4))], dim=-1)
    index = digits_to_index(digits, radices)
    assert index.shape == (2, 3, 4)
    assert torch.equal(index_to_digits(index, radices), digits)


def test_large_codebooks_stay_exact_in_int64():
    radices = (2,) * 62
    top = torch.tensor([1] * 62)
    assert digits_to_index(top, radices).item() == 2**62 - 1
    assert torch.equal(index_to_digits(torch.tensor(2**62 - 1), radices), top)


def test_refuses_what_it_cannot_pack():
    assert not fits_int64((1024,) * 8)
    with pytest.raises(ValueError, match="int64"):
        digits_to_index(torch.zeros(8, dtype=torch.long), (1024,) * 8)
    with pytest.raises(TypeError, match="integer"):
        digits_to_index(torch.zeros(2), (4, 4))
    with pytest.raises(ValueError, match="columns"):
        digits_to_index(torch.zeros(3, dtype=torch.long), (4, 4))


def test_perplexity_of_a_histogram():
    assert perplexity(torch.tensor([5, 0, 5, 0])).item() == pytest.approx(2.0)  # zero counts are ignored
    assert perplexity(torch.tensor([1, 1, 1, 1])).item() == pytest.approx(4.0)
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert perplexity(torch.tensor([2, 1, 1])).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert math.isnan(perplexity(torch.zeros(3, dtype=torch.long)).item())


@pytest.mark.parametrize("digits", [[8, 0], [0, 5], [-1, 0], [3, -2]])
def test_digits_outside_their_radix_are_an_error(digits):
    with pytest.raises(RuntimeError, match=r"digits_to_index: a digit is outside \[0, radix\) for radices \(8, 5\)"):
        digits_to_index(torch.tensor([[1, 1], digits]), (8, 5))


@pytest.mark.parametrize("index", [40, -1, 2**40])
def test_indices_outside_the_codebook_are_an_error(index):
    with pytest.raises(RuntimeError, match=r"index_to_digits: an index is outside \[0, 40\)"):
        index_to_digits(torch.tensor([0, index]), (8, 5))
