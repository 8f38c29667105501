"""No quantization ("identity"): the continuous-autoencoder baseline; vqlab's own.

``z_q = z`` with the identity gradient, no losses and codes of shape ``(B, N, 0)``
(``radices == ()``), so the same model, trainer and analyses run with the bottleneck's
quantization removed. ``discrete = False``: there are no codes, and ``decode`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, registry
from vqlab.schema import require


@dataclass(frozen=True)
class IdentityConfig(QuantizerConfig):
    name: str = "identity"
    dim: int = 64

    def __post_init__(self):
        require(self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")


@registry.register("identity", IdentityConfig)
class Identity(Quantizer):
    discrete = False

    def __init__(self, cfg: IdentityConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.radices = ()

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        return z.float()

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        return QuantizerOutput(z_q=z, codes=self.encode_fp32(z))

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*z.shape[:-1], 0, dtype=torch.int64, device=z.device)  # (B, N, 0)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "the identity quantizer is continuous: it has no codes, so there is nothing to decode; "
            "use the z_q that its forward returns"
        )
