"""``python -m vqlab.doctor``: which pretrained weights are present, and where missing ones go."""

from __future__ import annotations

import sys

from vqlab import weights


def main() -> int:
    print(f"torch hub cache: {weights.hub_checkpoints()}  (set TORCH_HOME to move it)")
    missing = 0
    for entry, path, present in weights.status():
        missing += not present
        state = "ok     " if present else "MISSING"
        print(f"  {state} {entry.name:14s} {entry.used_by:52s} {path}")
    if missing:
        print(f"{missing} missing: copy each file to the path shown (URLs in vqlab/weights.py).")
        print("Training-time validation skips metrics whose weights are missing; losses that need them fail.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
