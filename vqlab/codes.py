"""Digits <-> flat index, the one place in vqlab that packs code indices, and code-histogram helpers.

Index spec (README, "Quantizers"): the flat index of a code with digits ``d`` over ``radices`` is
``sum(d[i] * prod(radices[:i]))``; digit 0 is the least significant and the index is int64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

INT64_MAX = 2**63 - 1


def codebook_size(radices: Sequence[int]) -> int:
    """Number of distinct codes, ``prod(radices)`` (a Python int, never overflowing)."""
    size = 1
    for radix in radices:  # a loop, not a generator inside math.prod: torch.compile traces it without a break
        size *= int(radix)
    return size


def fits_int64(radices: Sequence[int]) -> bool:
    """Whether every flat index over ``radices`` is representable as int64."""
    return codebook_size(radices) - 1 <= INT64_MAX


def _place_values(radices: Sequence[int], device: torch.device) -> torch.Tensor:
    if not radices or any(int(r) < 2 for r in radices):
        raise ValueError(f"radices must be a non-empty sequence of integers >= 2, got {tuple(radices)}")
    if not fits_int64(radices):
        raise ValueError(
            f"prod(radices) = {codebook_size(radices)} does not fit an int64 flat index; work with the digits instead"
        )
    places = [1]
    for r in radices[:-1]:
        places.append(places[-1] * int(r))
    return torch.tensor(places, dtype=torch.int64, device=device)


def check_digits(digits: torch.Tensor, radices: Sequence[int], what: str = "digits") -> None:
    """Fail unless every digit of ``(..., G)`` ``digits`` lies in ``[0, radices[g])`` of its column.
    Asynchronous, so it runs on every training step without a host-device sync: on the CPU it
    raises at once with this message, on a GPU as a device-side assert at the next sync."""
    bases = torch.tensor([int(r) for r in radices], dtype=torch.int64, device=digits.device)
    in_range = ((digits >= 0) & (digits < bases)).all()
    torch._assert_async(in_range, f"{what}: a digit is outside [0, radix) for radices {tuple(radices)}")


def digits_to_index(digits: torch.Tensor, radices: Sequence[int]) -> torch.Tensor:
    """``(..., G)`` integer digits, each in ``[0, radix)``, -> ``(...)`` int64 flat indices."""
    if digits.is_floating_point():
        raise TypeError("digits must be an integer tensor; indices never pass through floats")
    if digits.shape[-1] != len(radices):
        raise ValueError(f"digits have {digits.shape[-1]} columns but there are {len(radices)} radices")
    places = _place_values(radices, digits.device)
    check_digits(digits, radices, "digits_to_index")
    return (digits.long() * places).sum(dim=-1)


def index_to_digits(index: torch.Tensor, radices: Sequence[int]) -> torch.Tensor:
    """``(...)`` integer flat indices in ``[0, prod(radices))`` -> ``(..., G)`` int64 digits."""
    if index.is_floating_point():
        raise TypeError("index must be an integer tensor; indices never pass through floats")
    places = _place_values(radices, index.device)
    in_range = ((index >= 0) & (index <= codebook_size(radices) - 1)).all()
    torch._assert_async(in_range, f"index_to_digits: an index is outside [0, {codebook_size(radices)})")
    bases = torch.tensor([int(r) for r in radices], dtype=torch.int64, device=index.device)
    return torch.div(index.long().unsqueeze(-1), places, rounding_mode="floor") % bases


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a histogram of code counts, in float64; zero counts add nothing (0 log 0 =
    0) and an empty or all-zero histogram has no perplexity (NaN). No value is read on the host."""
    if counts.numel() == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=counts.device)
    counts = counts.double()
    return torch.special.entr(counts / counts.sum()).sum().exp()
