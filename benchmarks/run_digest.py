"""A digest of what a smoke run, a resumed smoke run and a smoke sweep write: for checking that a
refactor leaves every logged value and every weight bit-identical.

    OMP_NUM_THREADS=1 python benchmarks/run_digest.py --out digest.json

Each part trains in a fresh temporary ``tracking.root`` at one thread; the digest is the SHA-256
of ``metrics.jsonl`` (wall-clock keys such as ``train/images_per_s`` left out) and of the final
checkpoint's model weights. Compare two digests with ``diff``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

WALL_CLOCK = ("train/images_per_s", "train/peak_memory_gb")


def metrics_digest(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    kept = [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def weights_digest(checkpoint: Path) -> str:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    sha = hashlib.sha256()
    for name in sorted(state):
        sha.update(name.encode())
        sha.update(state[name].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def run_digest(run: Path) -> dict[str, str]:
    final = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    return {"metrics": metrics_digest(run / "metrics.jsonl"), "weights": weights_digest(final), "final": final.name}


def train(root: Path, *args: str) -> None:
    base = ["--config", "smoke", f"tracking.root={root}", "tracking.run_name=r", "train.checkpoint_every=4"]
    subprocess.run([sys.executable, "-m", "vqlab.train", *base, "train.steps=8", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    digest = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        train(root / "plain")
        digest["run"] = run_digest(root / "plain" / "smoke" / "r")
        # a resume: the same run cut back to its step-4 checkpoint, then continued
        train(root / "resumed")
        run = root / "resumed" / "smoke" / "r"
        (run / "checkpoints" / "step_0000008.pt").unlink()
        (run / "checkpoints" / "last").write_text("step_0000004.pt\n")
        train(root / "resumed", "--resume", "auto")
        digest["resume"] = run_digest(run)
        sweep = root / "sweep.yaml"
        sweep.write_text(
            json.dumps({"name": "digest", "base": "smoke", "variants": {"fsq": {}, "vq": {"quantizer.name": "vq_ema"}}})
        )
        subprocess.run(
            [sys.executable, "-m", "vqlab.sweep", str(sweep), f"tracking.root={root / 'sweep'}", "train.steps=8"],
            check=True,
        )
        digest["sweep"] = {v: run_digest(root / "sweep" / "digest" / v) for v in ("fsq", "vq")}
    args.out.write_text(json.dumps(digest, indent=2) + "\n")
    print(json.dumps(digest, indent=2))


if __name__ == "__main__":
    main()
