"""``python -m vqlab.doctor``: whether the pretrained weights vqlab reads are present and intact,
which presets need them, and where missing ones go.

Checked: every file in ``vqlab.weights`` (present; sha256 against the prefix its torch hub name
carries) and every LPIPS head (the calibrated linear layers inside the ``lpips`` package: present
and loadable). Exits 1 when a file some preset needs is missing or any file is wrong, else 0.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vqlab import weights
from vqlab.config import RunConfig, load, presets
from vqlab.evaluators import fidelity
from vqlab.lpips_network import TRUNKS

# The config keys that take an explicit file instead of the hub cache.
SETTINGS = {
    "alexnet": "loss.perceptual.weights_path / eval.lpips_weights",
    "vgg16": "loss.perceptual.weights_path / eval.lpips_weights",
    "squeezenet1_1": "loss.perceptual.weights_path / eval.lpips_weights",
    "inception": "eval.inception_weights",
}


@dataclass
class Item:
    name: str  # a vqlab.weights name, or lpips_<net> for an LPIPS head
    used_by: str
    path: Path
    problem: str | None  # None when the file is fine
    needed_by: list[str] = field(default_factory=list)  # presets

    @property
    def state(self) -> str:
        return "ok" if self.problem is None else "MISSING" if self.problem == "missing" else "WRONG"

    @property
    def failing(self) -> bool:
        return self.state == "WRONG" or (self.state == "MISSING" and bool(self.needed_by))


def lpips_layers() -> Path | None:
    """The calibrated LPIPS linear layers ship inside the ``lpips`` package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "weights" / "v0.1"


def lpips_heads() -> dict[str, Path]:
    """Each trunk's head file (``alex.pth``, ...); under a placeholder folder without the package."""
    layers = lpips_layers() or Path("<lpips package not installed>")
    return {net: layers / f"{net}.pth" for net in TRUNKS}


def check_head(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same finding
        return f"does not load: {err}"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "is not a state dict of tensors"
    return None


def needs(cfg: RunConfig) -> set[tuple[str, str]]:
    """The weights a run of ``cfg`` reads, as (name, explicit file or "" for the default place)."""
    nets = []
    if cfg.loss.perceptual.weight > 0:
        nets.append((cfg.loss.perceptual.net, cfg.loss.perceptual.weights_path))
    if "lpips" in cfg.eval.metrics:
        nets.append((cfg.eval.lpips_net, cfg.eval.lpips_weights))
    needed = {pair for net, explicit in nets for pair in ((TRUNKS[net], explicit), (f"lpips_{net}", ""))}
    if "fid" in cfg.eval.metrics:
        needed.add(("inception", cfg.eval.inception_weights))
    return needed


def inventory() -> list[Item]:
    """Every weights file and LPIPS head, each with the presets that need it."""
    items = {(w.name, path): Item(w.name, w.used_by, path, problem) for w, path, problem in weights.status()}
    for net, path in lpips_heads().items():
        items[(f"lpips_{net}", path)] = Item(f"lpips_{net}", f"LPIPS ({net}) head", path, check_head(path))
    for preset in presets():
        for name, explicit in needs(load(preset)):
            if name.startswith("lpips_"):
                path = lpips_heads()[name.removeprefix("lpips_")]
            else:
                path = weights.expected_path(name, explicit)
            if (name, path) not in items:
                items[(name, path)] = Item(name, weights.REGISTRY[name].used_by, path, weights.check(path))
            items[(name, path)].needed_by.append(preset)
    return list(items.values())


def main() -> int:
    print(f"torch hub cache: {weights.hub_checkpoints()}  (set TORCH_HOME to move it)")
    items = inventory()
    for item in items:
        print(f"  {item.state:7s} {item.name:14s} {item.used_by:52s} {item.path}")
        notes = [f"needed by {', '.join(item.needed_by)}" if item.needed_by else "no preset needs it"]
        if item.name in SETTINGS:
            notes.append(f"or a file named by {SETTINGS[item.name]}")
        if item.state == "WRONG":
            notes.insert(0, item.problem)
        print(f"  {'':7s} {'':14s} {'; '.join(notes)}")
    cache = fidelity.default_cache_dir()
    count = len(list(cache.glob("*.npz"))) if cache.is_dir() else 0
    print(f"FID reference features: {cache}  ({count} Inception weights cached; eval.reference_cache moves it)")
    failing = [item for item in items if item.failing]
    if failing:
        print(
            f"{len(failing)} problem(s): {', '.join(f'{item.name} {item.state}' for item in failing)}. "
            "Copy each file to the path shown (URLs in vqlab/weights.py); a WRONG file is another "
            "or damaged file: replace it."
        )
    if any(item.state == "MISSING" for item in items):
        print(
            "Training-time validation skips metrics whose weights are missing, with a warning "
            "(eval.missing_weights=error fails instead); losses that need them fail."
        )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
