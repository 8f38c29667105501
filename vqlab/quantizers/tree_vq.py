"""Two-level tree-structured vector quantization ("tree_vq").

Tree-searched VQ: Buzo, Gray, Gray & Markel, "Speech coding based upon vector quantization", IEEE
Transactions on Acoustics, Speech, and Signal Processing 28(5), 1980; see also Gersho & Gray, "Vector
Quantization and Signal Compression" (Kluwer, 1992), on tree-structured VQ. Here with gradient-trained
codebooks, as ``vq`` (van den Oord et al., 2017, https://arxiv.org/abs/1711.00937).

A token picks the nearest of ``parents`` (n) codes, then the nearest of that parent's ``children`` (m)
codes: n + n·m stored codes spell n·m leaves, where flat VQ stores n·m and residual VQ over two VQ
stages n + m (the decomposition study's "tree"). The leaf is ``e_p + o_pj``: a child is stored as an
offset from its parent, the same points a tree stores as absolute leaves, parametrised so that a
child moves with its parent (and follows it when the parent is re-seeded) and starts next to it.
Offsets start as ``N(0, child_scale²)``: small, random directions, so each child first wins the
residuals that point its way and no two children of a parent tie (all-zero offsets would send
every token to child 0 for good, as the search keeps the lowest index among ties).

The parent level is a ``vq`` over the full width (``parents`` codes: its k-means init, dead-code
re-seeding and the optimizer-step hook, driven by this quantizer), losses under ``parent/``. The
child level is a second residual stage whose codebook the parent chooses: the residual
``r = z − zq_parent`` is not detached, exactly as ``rvq`` chains its stages, so ``z_q = zq_parent +
st(r, o)`` has the identity gradient to ``z``, the child losses ``child/codebook = ‖sg[r] − o‖²``
train the offsets and ``child/commitment = β‖r − sg[o]‖²`` is constant to the encoder (reported, as
an ``rvq`` stage's is). With one child per parent and zero offsets this is ``vq`` with ``parents``
codes exactly (codes, ``z_q`` and the parent losses). Children are not re-seeded: a child no token
reaches stays where it is (the batch's ``distinct_codes`` counts the leaves in use).

Codes are ``(B, N, 2)``, digit 0 the child and digit 1 the parent (the index spec's least
significant digit first, as the decomposition study writes two-level codes), so
``radices == (children, parents)`` and the flat index is ``child + children · parent``; with one
child per parent the child digit, always 0, is left out: ``(B, N, 1)`` codes over ``(parents,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.cluster import block_elements
from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry, straight_through
from vqlab.quantizers.vq import VQ, VQConfig
from vqlab.schema import ConfigError, require


@dataclass(frozen=True)
class TreeVQConfig(QuantizerConfig):
    """``parents``, ``dim``, ``beta``, ``init``, ``kmeans_iters``, ``dead_code_steps``: the parent
    level's ``vq`` options; ``children`` per parent; ``child_scale``: std of the initial offsets."""

    name: str = "tree_vq"
    parents: int = 32
    children: int = 32
    dim: int = 32
    beta: float = 0.25
    init: Literal["uniform", "normal", "kmeans"] = "kmeans"
    kmeans_iters: int = 10
    dead_code_steps: int = 10
    child_scale: float = 0.01

    def __post_init__(self):
        try:  # vq's own checks of the parent level's options, under this config's keys
            self.parent_config()
        except ConfigError as err:
            raise ConfigError("parents" if err.key == "codebook_size" else err.key, err.message) from None
        require(self.children >= 1, "children", f"must be >= 1, got {self.children}")
        require(self.child_scale > 0, "child_scale", f"must be > 0 (0: every child ties), got {self.child_scale}")

    def parent_config(self) -> VQConfig:
        return VQConfig(
            codebook_size=self.parents,
            dim=self.dim,
            beta=self.beta,
            init=self.init,
            kmeans_iters=self.kmeans_iters,
            dead_code_steps=self.dead_code_steps,
        )


@registry.register("tree_vq", TreeVQConfig)
class TreeVQ(Quantizer):
    cfg: TreeVQConfig
    mean_losses = frozenset({"parent/codebook", "parent/commitment", "child/codebook", "child/commitment"})

    def __init__(self, cfg: TreeVQConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        # one child per parent: its digit would always be 0, and the index spec has no radix 1
        self.radices = (cfg.children, cfg.parents) if cfg.children > 1 else (cfg.parents,)
        # driven by this quantizer's own hook methods below, as a composite drives its parts
        self.parent = VQ(cfg.parent_config()).hooks_driven_by_caller()
        self.offsets = nn.Parameter(torch.randn(cfg.parents, cfg.children, cfg.dim) * cfg.child_scale)  # (n, m, D)

    def nearest_child(self, residual: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        """``(M, D)`` residuals of tokens under ``(M,)`` parents -> ``(M,)`` their nearest child, from
        exact squared differences (the lowest index among ties), holding at most the device's
        ``block_elements`` floats of the gathered ``(tokens, m, D)`` children at a time."""
        rows = max(1, block_elements(residual.device) // (self.cfg.children * self.dim))
        chosen = []
        for start in range(0, residual.shape[0], rows):  # a count fixed by the shapes: one compiled graph
            offsets = self.offsets.detach()[parent[start : start + rows]]  # (r, m, D)
            distances = (residual[start : start + rows, None] - offsets).square().sum(-1)  # (r, m)
            chosen.append(distances.argmin(-1))
        return torch.cat(chosen)

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        top = self.parent.quantize(z)  # (B, N, D) z_q, (B, N, 1) codes; inside this forward's fp32 island
        parent = top.codes[..., 0]  # (B, N)
        residual = z - top.z_q  # (B, N, D), not detached: see the module docstring
        child = self.nearest_child(residual.detach().flatten(0, 1), parent.flatten()).reshape(parent.shape)  # (B, N)
        offset = self.offsets[parent, child]  # (B, N, D)
        losses = {f"parent/{name}": value for name, value in top.losses.items()}
        losses["child/codebook"] = F.mse_loss(offset, residual.detach())
        losses["child/commitment"] = self.cfg.beta * F.mse_loss(residual, offset.detach())
        return QuantizerOutput(
            z_q=top.z_q + straight_through(residual, offset),
            codes=self.digits(child, parent),
            losses=losses,
            stats={f"parent/{name}": value for name, value in top.stats.items()},
        )

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        return self.parent.relaxed(z)

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        parent = self.parent.encode_fp32(z)[..., 0]  # (B, N)
        residual = z - self.parent.decode_fp32(parent[..., None])  # (B, N, D)
        child = self.nearest_child(residual.flatten(0, 1), parent.flatten()).reshape(parent.shape)
        return self.digits(child, parent)

    def digits(self, child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` child and parent -> ``(B, N, G)`` codes over ``radices``."""
        return torch.stack([child, parent] if self.cfg.children > 1 else [parent], dim=-1)

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        parent = codes[..., -1]  # (...)
        child = codes[..., 0] if self.cfg.children > 1 else torch.zeros_like(parent)
        return self.parent.decode_fp32(parent[..., None]) + self.offsets[parent, child]  # (..., D)

    # the parent level's state (k-means init, usage, dead codes) follows this quantizer's hook
    def has_pending_updates(self) -> bool:
        return self.parent.has_pending_updates()

    def on_optimizer_step(self) -> None:
        self.parent.on_optimizer_step()
