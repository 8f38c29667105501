"""Batch statistics (perplexity, distinct codes): a dense histogram for small codebooks, sorted
runs for large ones, equal to counting the tokens' codes by hand, never reading the host."""

import math
from collections import Counter

import pytest
import torch

from vqlab.quantizers import base
from vqlab.quantizers.base import batch_stats

SMALL = (8, 5, 5, 5)  # 1000 codes: dense at 8 x 32 tokens, sorted at 2 x 32
WIDE = (8,) * 6  # 262,144 codes, one int64 index
HUGE = (1024,) * 8  # 2^80 codes: no int64 index, sorted digit by digit


def repeated_codes(radices, batch, n, distinct=37, seed=0):
    """``(batch, n, G)`` codes drawn from ``distinct`` random rows, so that codes repeat unevenly."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.stack([torch.randint(r, (distinct,), generator=generator) for r in radices], dim=-1)
    picks = (torch.rand(batch * n, generator=generator) ** 2 * distinct).long()  # skewed towards the first rows
    return pool[picks].reshape(batch, n, len(radices))


def by_hand(codes):
    counts = Counter(tuple(row) for row in codes.reshape(-1, codes.shape[-1]).tolist())
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return math.exp(entropy), len(counts)


@pytest.mark.parametrize(
    ("radices", "batch"),
    [(SMALL, 8), (SMALL, 2), (WIDE, 8), (HUGE, 8), ((2,) * 18, 4), ((4,) * 30, 4)],
    ids=["dense", "sorted-small", "sorted-int64", "sorted-digits", "bits", "2^60"],
)
def test_perplexity_and_distinct_codes_equal_counting_by_hand(radices, batch):
    codes = repeated_codes(radices, batch, 32)
    stats = batch_stats(codes, radices)
    perplexity, distinct = by_hand(codes)
    assert stats["distinct_codes"].item() == distinct
    assert stats["perplexity"].item() == pytest.approx(perplexity, rel=1e-5)


@pytest.mark.parametrize("radices", [SMALL, (2,) * 12], ids=["fsq", "bits"])
def test_the_dense_and_the_sorted_counts_agree_on_the_same_tokens(radices, monkeypatch):
    codes = repeated_codes(radices, 8, 32, distinct=200)
    monkeypatch.setattr(base, "DENSE_CODES_PER_TOKEN", 10**9)
    dense = batch_stats(codes, radices)
    monkeypatch.setattr(base, "DENSE_CODES_PER_TOKEN", 0)
    runs = batch_stats(codes, radices)
    assert dense["distinct_codes"] == runs["distinct_codes"] > 50
    torch.testing.assert_close(dense["perplexity"], runs["perplexity"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("radices", [SMALL, WIDE, HUGE], ids=["dense", "sorted-int64", "sorted-digits"])
def test_no_value_is_read_on_the_host(radices, no_host_reads):
    codes = repeated_codes(radices, 8, 32)
    no_host_reads()
    stats = batch_stats(codes, radices)
    assert set(stats) == {"perplexity", "distinct_codes"}


@pytest.mark.parametrize("radices", [WIDE, HUGE], ids=["sorted-int64", "sorted-digits"])
def test_the_sorted_counts_compile_into_one_graph(radices):
    codes = repeated_codes(radices, 8, 32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(batch_stats)(codes, radices)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
