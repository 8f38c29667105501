"""Loader throughput: an ImageFolder of JPEGs read at training resolution, by worker count.

    python benchmarks/data.py                              # 1024 JPEGs from the photos, 128 px, batch 32
    python benchmarks/data.py --step-rate 3904 --out runs/bench/data.json

Writes ``--count`` JPEGs (random 256-pixel crops of the training photos, quality 90) to a temporary
folder (or reads ``--folder``), then times ``vqlab.data``'s training loader over them, exactly as a
run with ``data.name=imagefolder`` builds it (decode, resize, centre crop, flip), for each worker
count: images/s over ``--batches`` batches after the first. With ``--step-rate`` (a training step's
images/s, e.g. from benchmarks/train_step.py) each row says whether the loader would hold the
step back. Prints a table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vqlab import data
from vqlab.config import DataConfig


def write_jpegs(folder: Path, count: int, size: int = 256, seed: int = 0) -> None:
    """``count`` random ``size``-pixel crops of the training photos large enough to hold one, as
    JPEGs under ``folder/photos``."""
    from PIL import Image

    photos = [data.load_photo(*p) for p in data.TRAIN_PHOTOS]  # (3, H, W) uint8
    photos = [p for p in photos if min(p.shape[1:]) >= size]
    rng = np.random.default_rng(seed)
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[1] - size + 1)
        left = rng.integers(0, photo.shape[2] - size + 1)
        crop = photo[:, top : top + size, left : left + size].permute(1, 2, 0).numpy()
        Image.fromarray(crop).save(folder / "photos" / f"{i:06d}.jpg", quality=90)


def images_per_second(folder: Path, workers: int, image_size: int, batch: int, batches: int) -> float:
    cfg = DataConfig(
        name="imagefolder",
        root=str(folder),
        image_size=image_size,
        batch_size=batch,
        val_count=batch,
        num_workers=workers,
    )
    loader = data.train_loader(data.build_datasets(cfg, seed=0).train, cfg, seed=0)
    data.set_epoch(loader, 0)
    stream = iter(loader)
    next(stream)  # workers started, first batch decoded
    started, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images = next(stream)
        except StopIteration:
            data.set_epoch(loader, 1)
            stream = iter(loader)
            images = next(stream)
        seen += len(images[0] if isinstance(images, (list, tuple)) else images)
    return seen / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(prog="python benchmarks/data.py", description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an existing image folder (default: write JPEGs to a temp one)")
    parser.add_argument("--count", type=int, default=1024, help="JPEGs to write")
    parser.add_argument("--workers", nargs="+", type=int, default=[w for w in (0, 1, 2, 4, 8, 16) if w <= cores])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per worker count")
    parser.add_argument("--step-rate", type=float, help="a training step's images/s, to compare with")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.count < args.batch * 2 or min(args.workers) < 0 or args.batches < 1:
        parser.error("--count must hold two batches; --workers >= 0; --batches >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        if args.folder is None:
            write_jpegs(folder, args.count)
        rows = []
        for workers in args.workers:
            rate = images_per_second(folder, workers, args.image_size, args.batch, args.batches)
            row = {"workers": workers, "images_per_s": rate}
            if args.step_rate:
                row["bottleneck"] = rate < args.step_rate
            rows.append(row)
    print(f"{args.image_size} px, batch {args.batch}, {cores} CPU cores, torch {torch.__version__}")
    print("| workers | images/s |" + (f" below the step's {args.step_rate:.0f}/s? |" if args.step_rate else ""))
    print("|---|---|" + ("---|" if args.step_rate else ""))
    for row in rows:
        verdict = f" {'yes' if row['bottleneck'] else 'no'} |" if args.step_rate else ""
        print(f"| {row['workers']} | {row['images_per_s']:.0f} |{verdict}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {"image_size": args.image_size, "batch": args.batch, "cores": cores, "step_rate": args.step_rate}
        args.out.write_text(json.dumps({**settings, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
