"""Quantizers: one file each, registered by name. Adding a method is adding a file here."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from vqlab.quantizers.base import (
    Quantizer,
    QuantizerConfig,
    QuantizerOutput,
    registry,
    straight_through,
)
from vqlab.runtime import fp32_island
from vqlab.schema import parse

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def available() -> list[str]:
    """Names of the registered quantizers."""
    return registry.names()


def build(name_or_cfg: str | QuantizerConfig, **options: Any) -> Quantizer:
    """``build("fsq", levels=[8, 5, 5, 5])`` or ``build(cfg)``; options are type-checked."""
    if isinstance(name_or_cfg, QuantizerConfig):
        if options:
            raise TypeError("pass either a config or a name with options, not both")
        cfg = name_or_cfg
    else:
        cfg = parse(QuantizerConfig, {"name": name_or_cfg, **options})
    return registry.get(cfg.name).builder(cfg)


__all__ = [
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "available",
    "build",
    "fp32_island",
    "registry",
    "straight_through",
]
