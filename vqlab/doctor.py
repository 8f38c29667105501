"""``python -m vqlab.doctor``: which pretrained weights are present, and where missing ones go."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from vqlab import weights
from vqlab.evaluators import fidelity

# The config keys that take an explicit file instead of the hub cache.
SETTINGS = {
    "alexnet": "loss.perceptual.weights_path / eval.lpips_weights",
    "vgg16": "loss.perceptual.weights_path / eval.lpips_weights",
    "squeezenet1_1": "loss.perceptual.weights_path / eval.lpips_weights",
    "inception": "eval.inception_weights",
}


def lpips_layers() -> Path | None:
    """The calibrated LPIPS linear layers ship inside the ``lpips`` package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "weights" / "v0.1"


def main() -> int:
    print(f"torch hub cache: {weights.hub_checkpoints()}  (set TORCH_HOME to move it)")
    missing = 0
    for entry, path, present in weights.status():
        missing += not present
        state = "ok     " if present else "MISSING"
        print(f"  {state} {entry.name:14s} {entry.used_by:52s} {path}")
        if entry.name in SETTINGS:
            print(f"  {'':7s} {'':14s} or a file named by {SETTINGS[entry.name]}")
    layers = lpips_layers()
    present = layers is not None and (layers / "alex.pth").is_file()
    label = "LPIPS linear layers (inside the lpips package)"
    print(f"  {'ok     ' if present else 'MISSING'} {'lpips layers':14s} {label:52s} {layers}")
    missing += not present
    cache = fidelity.default_cache_dir()
    count = len(list(cache.glob("*.npz"))) if cache.is_dir() else 0
    print(f"FID reference features: {cache}  ({count} Inception weights cached; eval.reference_cache moves it)")
    if missing:
        print(f"{missing} missing: copy each file to the path shown (URLs in vqlab/weights.py).")
        print(
            "Training-time validation skips metrics whose weights are missing, with a warning "
            "(eval.missing_weights=error fails instead); losses that need them fail."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
