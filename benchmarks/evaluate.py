"""Validation throughput: images/s of a validation pass, with every metric and with each alone.

    python benchmarks/evaluate.py                           # the reproduction model; CUDA if present
    python benchmarks/evaluate.py --config default --images 256 --out runs/bench/evaluate.json

Builds the preset's model (untrained: the cost of a pass does not depend on the weights) and runs
``vqlab.evaluators.measure``, the loop training-time validation and ``python -m vqlab.evaluate``
use, over ``--images`` synthetic images at the preset's resolution: once per metric set (each
metric alone, the model's pass included, then all of them), after one untimed warm-up pass. LPIPS and the
Inception metrics read their weights from the torch hub cache; where a file is missing, a stand-in
with the real architecture (``vqlab.weights.write_stand_in``) is written to a temporary
``TORCH_HOME``, so that the pass costs what it costs with the real files. Prints a table and writes
the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

METRICS = ("reconstruction", "codebook", "swd", "lpips", "fid")


def images_per_second(cfg, metrics: list[str], device: torch.device) -> float:
    from dataclasses import replace

    from vqlab import data, evaluators, quantizers
    from vqlab.models import build_autoencoder

    model = build_autoencoder(cfg.model, quantizers.build(cfg.quantizer)).to(device)
    eval_cfg = replace(cfg.eval, metrics=tuple(metrics))
    suite = evaluators.build(eval_cfg.metrics, model.quantizer.radices, device, eval_cfg)
    loader = data.val_loader(data.build_datasets(cfg.data, seed=0).val, cfg.data)
    evaluators.measure(model, loader, suite, device, cfg.train.dtype, "val")  # warm-up: kernels, caches
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    evaluators.measure(model, loader, suite, device, cfg.train.dtype, "val")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return cfg.data.val_count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python benchmarks/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="reproduction", help="the preset whose model and resolution run")
    parser.add_argument("--images", type=int, default=1024 if cuda else 64)
    parser.add_argument("--batch", type=int, default=128 if cuda else 32, help="validation batch size")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if cuda else "fp32")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch < 1:
        parser.error("--images and --batch must be >= 1")
    from vqlab import config, weights
    from vqlab.lpips_network import TRUNKS

    overrides = {
        "data.name": "synthetic",
        "data.val_count": args.images,
        "data.val_batch_size": args.batch,
        "train.dtype": args.dtype,
        "train.device": args.device,
    }
    cfg = config.load(args.config, overrides)
    device = torch.device(args.device)
    sets = [*([m] for m in args.metrics), list(args.metrics)]
    needed = [TRUNKS[cfg.eval.lpips_net]] * ("lpips" in args.metrics) + ["inception"] * ("fid" in args.metrics)
    with tempfile.TemporaryDirectory() as home:
        written = weights.stand_in_cache(Path(home), needed)
        rows = [{"metrics": "+".join(s), "images_per_s": images_per_second(cfg, s, device)} for s in sets]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{args.config} at {cfg.data.image_size} px, {args.images} images, batch {args.batch}, {args.dtype}, {where}")
    if written:
        print(f"stand-in weights (real architectures) for: {', '.join(written)}")
    print("| metrics | images/s |\n|---|---|")
    for row in rows:
        print(f"| {row['metrics']} | {row['images_per_s']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {"config": args.config, "images": args.images, "batch": args.batch, "dtype": args.dtype}
        args.out.write_text(json.dumps({**settings, "device": where, "stand_ins": written, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
