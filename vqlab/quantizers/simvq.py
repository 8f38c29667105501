"""SimVQ: a frozen random codebook reparameterised by one learned linear map ("simvq").

Addressing Representation Collapse in Vector Quantized Models with One Linear Layer (Zhu, Li, Liu,
Wang and Xu, 2024), https://arxiv.org/abs/2411.02038, Section 3.

The codes are ``C W``: ``C`` ``(K, d)`` is drawn once from N(0, 1) and never trained (a buffer), and
``W`` is a learned ``d x d`` linear map (``projection: linear``; ``mlp`` puts a GELU and a second
map after it). Each token takes its nearest row of ``C W``; the losses are VQ's, ``‖sg[z] − q‖²``
(which trains ``W``, and through it every code at once, used or not: the point of the paper)
plus ``β ‖z − sg[q]‖²``, with the straight-through or rotation-trick gradient (``estimator``), as
``vq``. The frozen codebook is never re-seeded or clustered (``init`` is ``normal`` or ``uniform``,
``dead_code_steps`` and ``dead_code_threshold`` 0): only ``W`` moves the codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vqlab.quantizers._codebook import CodebookQuantizer, initial_codebook
from vqlab.quantizers.base import registry
from vqlab.quantizers.vq import VQ, VQConfig
from vqlab.schema import require

PROJECTIONS = ("linear", "mlp")


@dataclass(frozen=True)
class SimVQConfig(VQConfig):
    name: str = "simvq"
    init: Literal["uniform", "normal", "kmeans"] = "normal"
    dead_code_steps: int = 0
    projection: Literal["linear", "mlp"] = "linear"

    def __post_init__(self):
        super().__post_init__()
        require(self.init != "kmeans", "init", "must be normal or uniform: the codebook C is frozen, W moves the codes")
        require(not self.replaces_dead_codes, "dead_code_steps", "must be 0 (and dead_code_threshold 0): C is frozen")
        require(
            self.projection in PROJECTIONS, "projection", f"must be one of {list(PROJECTIONS)}, got {self.projection!r}"
        )


@registry.register("simvq", SimVQConfig)
class SimVQ(VQ):
    cfg: SimVQConfig

    def __init__(self, cfg: SimVQConfig):
        CodebookQuantizer.__init__(self, cfg, usage_decay=cfg.usage_decay)
        self.register_buffer("embedding", initial_codebook(cfg.codebook_size, cfg.lookup_dim, cfg.init))  # C
        d = cfg.lookup_dim
        layers = [nn.Linear(d, d, bias=False)]
        if cfg.projection == "mlp":
            layers += [nn.GELU(), nn.Linear(d, d, bias=False)]
        self.projection = nn.Sequential(*layers)  # W

    def codebook(self) -> torch.Tensor:
        """``(K, d)`` the codes ``C W`` as compared with latents (normalised in cosine mode)."""
        return self.space.normalize(self.projection(self.embedding))
