"""What the composite quantizers (``rvq``, ``product``) share: parts built from one base config,
own or shared, each part's code packed as the flat index of its base digits."""

from __future__ import annotations

import torch
from torch import nn

from vqlab import codes as codes_lib
from vqlab.quantizers.base import Quantizer, QuantizerConfig, registry
from vqlab.schema import require


def require_discrete_base(base: QuantizerConfig, parts: str) -> None:
    """Config check shared by the composites: their parts must produce codes."""
    require(
        getattr(registry.get(base.name).builder, "discrete", True),
        "base",
        f"{base.name!r} is continuous; {parts} need a quantizer with codes",
    )


class Composite(Quantizer):
    def __init__(self, base: QuantizerConfig, count: int, shared: bool):
        super().__init__()
        from vqlab.quantizers import build  # the package finishes importing after its modules

        self.shared = shared
        # The composite's own on_optimizer_step drives its parts (a shared part runs several
        # times per forward, so it must not drive itself); the composite follows the contract.
        self.parts = nn.ModuleList(build(base).hooks_driven_by_caller() for _ in range(1 if shared else count))
        first = self.parts[0]
        require(
            codes_lib.fits_int64(first.radices),
            "base",
            f"a part's codebook of {first.codebook_size} codes does not fit an int64 index",
        )
        self.base_radices = tuple(first.radices)
        self.radices = (first.codebook_size,) * count

    def prefixed_mean_losses(self, prefix: str, count: int) -> frozenset[str]:
        """The part's mean-type loss names under the composite's keys ``{prefix}{k}/<loss>``."""
        return frozenset(f"{prefix}{k}/{name}" for k in range(count) for name in self.parts[0].mean_losses)

    def part(self, k: int) -> Quantizer:
        return self.parts[0 if self.shared else k]

    def pack(self, digits: torch.Tensor) -> torch.Tensor:
        """A part's ``(..., G_base)`` digits -> its ``(...)`` column of codes."""
        return codes_lib.digits_to_index(digits, self.base_radices)

    def unpack(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """Column ``k`` of ``(..., parts)`` codes -> that part's ``(..., G_base)`` digits."""
        return codes_lib.index_to_digits(codes[..., k], self.base_radices)

    def set_step(self, step: int, total_steps: int) -> None:
        for part in self.parts:
            part.set_step(step, total_steps)

    def has_pending_updates(self) -> bool:
        return any(part.has_pending_updates() for part in self.parts)

    def on_optimizer_step(self) -> None:
        # self.parts holds each module once, so a shared one applies its updates once per step
        for part in self.parts:
            part.on_optimizer_step()
