"""The ViT token mixers against their formulas, computed naively token pair by token pair."""

import math

import pytest
import torch

from vqlab.models.attention import Attention, linear_attention


def qkv(batch=2, heads=3, n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=g) for _ in range(3)]


def phi(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x + 1, x.exp())  # elu(x) + 1, written out


def naive_linear_attention(q, k, v, eps=1e-6):
    """O(N^2): out_i = sum_j (phi(q_i) . phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps), in float64."""
    q, k, v = phi(q.double()), phi(k.double()), v.double()
    out = torch.zeros_like(v)
    batch, heads, n, _ = q.shape
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                weights = [float(q[b, h, i] @ k[b, h, j]) for j in range(n)]
                out[b, h, i] = sum(w * v[b, h, j] for j, w in enumerate(weights)) / (sum(weights) + eps)
    return out


def naive_softmax_attention(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(v)
    batch, heads, n, d = q.shape
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                scores = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d) for j in range(n)]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                out[b, h, i] = sum(w * v[b, h, j] for j, w in enumerate(weights)) / sum(weights)
    return out


@pytest.mark.parametrize(("n", "d", "seed"), [(7, 5, 0), (1, 4, 1), (12, 8, 2)])
def test_linear_attention_matches_the_naive_formula(n, d, seed):
    q, k, v = qkv(n=n, d=d, seed=seed)
    out = linear_attention(q, k, v)
    assert out.shape == v.shape and out.dtype == v.dtype
    torch.testing.assert_close(out.double(), naive_linear_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_linear_attention_is_not_causal():
    q, k, v = qkv()
    v2 = v.clone()
    v2[:, :, -1] += 1
    assert not torch.allclose(linear_attention(q, k, v)[:, :, 0], linear_attention(q, k, v2)[:, :, 0])


def test_linear_attention_runs_in_fp32_under_bf16_autocast():
    q, k, v = (x.bfloat16() for x in qkv(n=64, d=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, linear_attention(q.float(), k.float(), v.float()).bfloat16())


@pytest.mark.parametrize(
    ("kind", "formula"), [("linear", naive_linear_attention), ("softmax", naive_softmax_attention)]
)
def test_attention_module_uses_the_chosen_mixer_per_head(kind, formula):
    torch.manual_seed(0)
    width, heads, n = 12, 3, 6
    module = Attention(width, heads, kind)
    x = torch.randn(2, n, width)
    with torch.no_grad():
        q, k, v = module.qkv(x).reshape(2, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, d)
        mixed = formula(q, k, v).float().transpose(1, 2).reshape(2, n, width)  # (B, N, D)
        torch.testing.assert_close(module(x), module.proj(mixed), atol=1e-5, rtol=1e-5)
