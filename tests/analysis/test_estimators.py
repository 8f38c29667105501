"""analysis.estimators against distributions whose entropy and information are known."""

import math

import numpy as np
import pytest
import torch

from analysis import estimators


def uniform_digits(count: int, radices: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(r, (count,), generator=generator) for r in radices], dim=-1)


def test_miller_madow_is_nearer_the_true_entropy_than_the_plugin_when_undersampled():
    samples = uniform_digits(2000, (1024,))  # 10 bits, about 2 draws per symbol
    counts = np.bincount(samples[:, 0].numpy(), minlength=1024)
    plugin, corrected = estimators.plugin_bits(counts), estimators.entropies(samples, (1024,))[0]
    seen = (counts > 0).sum()
    assert corrected - plugin == pytest.approx((seen - 1) / (2 * 2000 * math.log(2)))  # the formula
    assert 10 - plugin > 0.3  # the plug-in is far below
    assert abs(corrected - 10) < (10 - plugin) / 3


def test_the_shuffle_null_of_independent_digits_is_the_raw_information():
    """Independent 16 x 16 digits, N tokens: the plug-in MI is ~ chi2(225) / (2N ln 2) bits, mean
    0.020 bits at N = 8000, sd sqrt(2 * 225) / (2N ln 2) = 0.0019. raw − null (the null averaged over
    5 shuffles) has sd 0.0019 * sqrt(1 + 1/5): 4 sd is 0.0083, well under the bias it removes."""
    count, radices = 8000, (16, 16)
    bias = 225 / (2 * count * math.log(2))
    sd = math.sqrt(2 * 225) / (2 * count * math.log(2)) * math.sqrt(1 + 1 / estimators.PERMUTATIONS)
    for seed in range(3):
        found = estimators.information(uniform_digits(count, radices, seed), radices, seed=seed)
        assert found["raw"][0, 1] == pytest.approx(bias, abs=4 * sd)
        assert found["null"][0, 1] == pytest.approx(bias, abs=4 * sd)
        assert abs(found["corrected"][0, 1]) < 4 * sd
        assert np.all(np.diag(found["raw"]) == 0)


def test_a_copied_digit_shares_its_whole_entropy_once_corrected():
    digits = uniform_digits(20_000, (8, 5))
    codes = torch.stack([digits[:, 0], digits[:, 1], digits[:, 0]], dim=-1)  # digit 2 copies digit 0
    found = estimators.information(codes, (8, 5, 8))
    assert found["corrected"][0, 2] == pytest.approx(3, abs=0.01)  # H(digit 0) = log2 8
    assert abs(found["corrected"][0, 1]) < 0.005 and abs(found["corrected"][1, 2]) < 0.005
    assert found["null"][0, 2] > 0  # the null still sees only the sample's bias


def test_the_shuffle_null_is_seeded():
    codes = uniform_digits(500, (4, 4))
    a, b = estimators.information(codes, (4, 4), seed=1), estimators.information(codes, (4, 4), seed=1)
    assert np.array_equal(a["null"], b["null"])
    assert not np.array_equal(a["null"], estimators.information(codes, (4, 4), seed=2)["null"])


def test_the_bootstrap_resamples_crops_not_tokens():
    """The same token histogram as 64 crops of 64 independent tokens, or as 64 crops each of one
    code repeated: drawing crops, the second varies as 64 draws do, 8 times as much as 4096."""
    digits = uniform_digits(4096, (16,))
    independent = digits.reshape(64, 64, 1)
    repeated = digits[:64].repeat_interleave(64, dim=0).reshape(64, 64, 1)

    def entropy(tokens):
        return estimators.entropies(tokens, (16,))[0]

    widths = []
    for codes in (independent, repeated):
        estimate, low, high = estimators.bootstrap_over_crops(codes, entropy, resamples=300)
        assert estimate == entropy(codes.flatten(0, 1)) and low < estimate < high
        widths.append(high - low)
    assert widths[1] > 4 * widths[0]


def test_the_bootstrap_interval_of_independent_digits_holds_zero_information():
    codes = uniform_digits(256 * 32, (8, 8), seed=4).reshape(256, 32, 2)
    estimate, low, high = estimators.bootstrap_over_crops(
        codes, lambda tokens: estimators.information(tokens, (8, 8))["corrected"][0, 1], resamples=100
    )
    assert low < estimate < high and low < 0 < high and high - low < 0.02
    one = estimators.bootstrap_over_crops(codes[:1], lambda tokens: 1.0)
    assert one[0] == 1.0 and np.isnan(one[1]) and np.isnan(one[2])
