"""A whole training step of the reproduction model: images/s, peak memory and MFU, per variant.

    python benchmarks/train_step.py                       # CUDA if present, else a small CPU run
    python benchmarks/train_step.py --steps 200 --compile --out runs/bench/train_step.json

Runs ``python -m vqlab.train --config reproduction`` (conv width 512, f8, FSQ 8-5-5-5, 128 x 128,
batch 32) on the dependency-free ``synthetic`` images, tracking off, each variant in its own
process: fp32 and bf16, eager and (``--compile``) compiled, one plain process and torchrun with one
process; each without the perceptual loss and with it (LPIPS, its trunk's weights from the hub
cache, or stand-ins of the real architecture in a temporary ``TORCH_HOME`` where the files are
missing: the cost is the network's, not the values'). The data is already on the device: every
variant makes its batches there (``data.on_device``), except ``bf16 loader``, the same step fed by
the loader's workers (``benchmarks/data.py`` measures the loader alone). images/s is the median
over the logged windows after the first two, as the trainer logs it (``train/images_per_s``).
MFU is images/s times the
model FLOPs of one image's forward and backward, counted by ``torch.utils.flop_counter`` (the
perceptual network's FLOPs not included), over the card's peak (``--peak-tflops``, or the dense
bf16 / tf32 peaks of the cards named in ``PEAK_TFLOPS``). The upstream FSQ-pytorch recipe is not in
this run: its code is not available offline. Prints a table and writes the rows as JSON.
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
# dense peak TFLOP/s by card (bf16 tensor cores; fp32 runs as tf32 where allowed, else the fp32 peak)
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp32": 494.7}, "H200": {"bf16": 989.4, "fp32": 494.7}}


def variants(device: str, with_compile: bool) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (launcher, overrides), each without and with LPIPS."""
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
    on_device = ["data.on_device=true"]
    table = {
        "fp32": (single, ["train.dtype=fp32", *on_device]),
        "bf16": (single, ["train.dtype=bf16", *on_device]),
        "bf16 torchrun x1": (torchrun, ["train.dtype=bf16", *on_device]),
        "bf16 loader": (single, ["train.dtype=bf16", f"data.num_workers={min(8, os.cpu_count() or 1)}"]),
    }
    if with_compile:
        table["bf16 compile"] = (single, ["train.dtype=bf16", "train.compile=true", *on_device])
    result = {}
    for name, (launcher, options) in table.items():
        result[name] = (launcher, [*options, f"train.device={device}", "loss.perceptual.weight=0"])
        result[f"{name} + lpips"] = (launcher, [*options, f"train.device={device}", "loss.perceptual.weight=1.0"])
    return result


def run_variant(
    command: list[str],
    steps: int,
    image_size: int,
    batch: int,
    root: Path,
    name: str,
    extra: list[str],
    val_count: int = 64,
) -> dict:
    run_name = name.replace(" ", "-").replace("+", "with")
    overrides = [
        "--config",
        "reproduction",
        "data.name=synthetic",
        f"data.image_size={image_size}",
        f"data.batch_size={batch}",
        f"data.val_count={val_count}",
        f"data.train_count={max(steps * batch, 1024)}",
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
    # torchrun sets OMP_NUM_THREADS=1 where it is unset: give every variant the same threads
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    done = subprocess.run([*command, *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"variant": name, "error": done.stderr[-2000:]}
    rows = RunFolder(root / "reproduction" / run_name).read_metrics()
    speeds = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r][2:]
    return {
        "variant": name,
        "images_per_s": statistics.median(speeds) if speeds else float("nan"),
        "peak_memory_gib": max((r.get("train/peak_memory_gb", 0.0) for r in rows), default=0.0),
        "final_train_l1": next(r["train/l1"] for r in reversed(rows) if "train/l1" in r),
    }


def flops_per_image(image_size: int, batch: int) -> float:
    """Forward and backward FLOPs of the reproduction model per image (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vqlab import config, quantizers
    from vqlab.models import build_autoencoder

    cfg = config.load("reproduction")
    model = build_autoencoder(cfg.model, quantizers.build(cfg.quantizer))
    images = torch.randn(batch, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(images).reconstruction.square().mean().backward()
    return counter.get_total_flops() / batch


def peak_tflops(device: str, given: float | None) -> dict[str, float]:
    if given:
        return {"bf16": given, "fp32": given}
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    return next((peaks for card, peaks in PEAK_TFLOPS.items() if card in name), {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per variant (default: 150 GPU, 12 CPU)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also time bf16 with torch.compile")
    parser.add_argument("--variants", nargs="+", help="only these variants (names as in the table)")
    parser.add_argument(
        "--val-count", type=int, default=64, help="validation crops of each run (untimed; bf16 on a CPU is slow)"
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU (default: PEAK_TFLOPS by name)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "train_step.json")
    args = parser.parse_args()
    steps = args.steps or (150 if args.device == "cuda" else 12)
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    chosen = variants(args.device, args.compile)
    if args.variants:
        unknown = sorted(set(args.variants) - set(chosen))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(chosen)}")
        chosen = {name: chosen[name] for name in args.variants}
    flops = flops_per_image(args.image_size, min(args.batch, 4))
    peaks = peak_tflops(args.device, args.peak_tflops)
    results = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        from vqlab import config, weights
        from vqlab.lpips_network import TRUNKS

        trunk = TRUNKS[config.load("reproduction").loss.perceptual.net]  # the training loss's trunk
        stand_ins = weights.stand_in_cache(Path(tmp) / "torch_home", [trunk])
        report = {"device": card, "torch": torch.__version__, "steps": steps, "batch": args.batch}
        report |= {"image_size": args.image_size, "flops_per_image": flops, "stand_ins": stand_ins}
        for name, (launcher, options) in chosen.items():
            row = run_variant(launcher, steps, args.image_size, args.batch, Path(tmp), name, options, args.val_count)
            peak = peaks.get("bf16" if "bf16" in name else "fp32")
            if "images_per_s" in row and peak:
                row["mfu"] = row["images_per_s"] * flops / (peak * 1e12)
            results.append(row)
            print(json.dumps(results[-1]), file=sys.stderr)
            # after every variant, so that a run stopped part-way keeps the rows it finished
            args.out.write_text(json.dumps({**report, "results": results}, indent=2))
    print(f"\n{card}, torch {torch.__version__}, {steps} steps of batch {args.batch} at {args.image_size}px")
    print(f"model FLOPs per image (forward + backward): {flops / 1e9:.1f} GFLOP")
    if stand_ins:
        print(f"LPIPS trunk: stand-in weights with the real architecture ({', '.join(stand_ins)})")
    print("\n| variant | images/s | peak GiB | MFU | train l1 |\n|---|---|---|---|---|")
    for row in results:
        if "error" in row:
            print(f"| {row['variant']} | FAILED: {row['error'].strip().splitlines()[-1] if row['error'] else ''} |")
        else:
            mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "—"
            speed, memory, l1 = row["images_per_s"], row["peak_memory_gib"], row["final_train_l1"]
            print(f"| {row['variant']} | {speed:.1f} | {memory:.2f} | {mfu} | {l1:.4f} |")
    print(f"\nwrote {args.out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
