"""Training throughput of the reproduction model: fp32 vs bf16, single process vs torchrun.

    python benchmarks/throughput.py                      # CUDA if present, else a small CPU run
    python benchmarks/throughput.py --steps 200 --out runs/throughput.json

Runs the `reproduction` preset's model (conv width 512, f8, FSQ 8-5-5-5, 128x128, batch 32) on
the dependency-free `synthetic` images, without LPIPS or MLflow, each variant in its own process.
Prints a table (images/s = median over the logged windows after the first two, peak GPU memory)
and writes the same rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vqlab.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def variants(device: str, with_compile: bool) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (launcher, overrides)."""
    single = [sys.executable, "-m", "vqlab.train"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=1",
        "-m",
        "vqlab.train",
    ]
    table = {
        "fp32": (single, ["train.dtype=fp32"]),
        "bf16": (single, ["train.dtype=bf16"]),
        "bf16 torchrun x1": (torchrun, ["train.dtype=bf16"]),
    }
    if with_compile:
        table["bf16 compile"] = (single, ["train.dtype=bf16", "train.compile=true"])
    return {name: (launcher, [*options, f"train.device={device}"]) for name, (launcher, options) in table.items()}


def run_variant(
    command: list[str], steps: int, image_size: int, batch: int, root: Path, name: str, extra: list[str]
) -> dict:
    run_name = name.replace(" ", "-")
    overrides = [
        "--config",
        "reproduction",
        "data.name=synthetic",
        f"data.image_size={image_size}",
        f"data.batch_size={batch}",
        "data.val_count=64",
        f"data.train_count={max(steps * batch, 1024)}",
        f"data.num_workers={min(8, os.cpu_count() or 1)}",
        "loss.perceptual.weight=0",
        f"train.steps={steps}",
        f"train.log_every={max(steps // 10, 1)}",
        "optim.warmup_steps=0",
        "train.checkpoint_every=0",
        "eval.every=0",
        "tracking.mlflow=false",
        "tracking.progress=false",
        f"tracking.root={root}",
        f"tracking.run_name={run_name}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([*command, *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"variant": name, "error": done.stderr[-2000:]}
    rows = RunFolder(root / "reproduction" / run_name).read_metrics()
    speeds = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r][2:]
    peak = max((r.get("train/peak_memory_gb", 0.0) for r in rows), default=0.0)
    return {
        "variant": name,
        "images_per_s": statistics.median(speeds) if speeds else float("nan"),
        "peak_memory_gib": peak,
        "final_train_l1": next(r["train/l1"] for r in reversed(rows) if "train/l1" in r),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per variant (default: 150 GPU, 12 CPU)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also time bf16 with torch.compile")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "throughput.json")
    args = parser.parse_args()
    steps = args.steps or (150 if args.device == "cuda" else 12)
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (launcher, options) in variants(args.device, args.compile).items():
            results.append(run_variant(launcher, steps, args.image_size, args.batch, Path(tmp), name, options))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(f"\n{card}, torch {torch.__version__}, {steps} steps of batch {args.batch} at {args.image_size}px\n")
    print(f"{'variant':20s} {'images/s':>10s} {'peak GiB':>9s} {'train l1':>9s}")
    for row in results:
        if "error" in row:
            print(f"{row['variant']:20s} FAILED: {row['error'].splitlines()[-1] if row['error'] else ''}")
        else:
            speed, memory, l1 = row["images_per_s"], row["peak_memory_gib"], row["final_train_l1"]
            print(f"{row['variant']:20s} {speed:10.1f} {memory:9.2f} {l1:9.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": card,
        "torch": torch.__version__,
        "steps": steps,
        "batch": args.batch,
        "image_size": args.image_size,
    }
    args.out.write_text(json.dumps({**report, "results": results}, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
