"""Token mixers of the ViT backbone, chosen by one config key so that softmax versus linear
attention is a one-key ablation: softmax attention (Vaswani et al., arXiv 1706.03762) through
``scaled_dot_product_attention``, and the non-causal linear attention of Katharopoulos et al.,
"Transformers are RNNs" (arXiv 2006.16236), with feature map phi(x) = elu(x) + 1.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.runtime import fp32_island


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps)`` per head, in
    O(N d^2): q, k, v ``(B, heads, N, d)`` -> ``(B, heads, N, d)`` in v's dtype."""
    # The sums over all N tokens (and the normaliser's ratio) lose most of their digits in bf16's
    # 8-bit mantissa; fp32 keeps them exact enough at the cost of a d x d matrix per head.
    with fp32_island(q.device):
        q, k = F.elu(q.float()) + 1, F.elu(k.float()) + 1
        kv = torch.einsum("bhnd,bhne->bhde", k, v.float())  # (B, heads, d, d)
        normaliser = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2))  # (B, heads, N)
        out = torch.einsum("bhnd,bhde->bhne", q, kv) / (normaliser.unsqueeze(-1) + eps)  # (B, heads, N, d)
    return out.to(v.dtype)


class Attention(nn.Module):
    """Multi-head, non-causal self-attention over tokens ``(B, N, D)`` with the chosen mixer."""

    def __init__(self, width: int, heads: int, kind: Literal["softmax", "linear"]):
        super().__init__()
        self.heads = heads
        self.mix = F.scaled_dot_product_attention if kind == "softmax" else linear_attention
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, width = x.shape
        qkv = self.qkv(x).reshape(batch, n, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, d)
        out = self.mix(q, k, v)  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(batch, n, width))
