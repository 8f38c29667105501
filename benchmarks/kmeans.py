"""k-means initialisation of a codebook: vqlab's against the peer's and scikit-learn's, in one run.

    python benchmarks/kmeans.py                          # CUDA when present (K up to 65536), else CPU
    python benchmarks/kmeans.py --codes 1024 65536 --points 65536 --out runs/bench/kmeans.json

What a codebook's k-means init does: ``--points`` latents of dimension ``--dim`` (a mixture of
Gaussian blobs, seeded) clustered into K codes with ``--iters`` Lloyd steps. vqlab:
``vqlab.cluster.kmeans`` (greedy k-means++ seeding up to 4096 codes, k-means|| above, blocked
nearest-code search). Peer: vector-quantize-pytorch's ``kmeans`` (seeds drawn uniformly, dense
distances). scikit-learn: ``KMeans(init="k-means++", n_init=1, algorithm="lloyd")`` on the CPU,
up to ``--sklearn-max`` codes. Seeding and the whole fit are timed separately (the seeding runs
alone first), and every result is scored the same way: the mean squared distance of a point to its
nearest centroid (lower is better). Memory: the fit's peak on CUDA. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vqlab import cluster


def blobs(points: int, dim: int, device: str, seed: int = 0) -> torch.Tensor:
    """``(points, dim)`` latents around ``points // 64`` centres: structure for k-means to find."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(points // 64, 1), dim, generator=generator) * 3
    picks = torch.randint(len(centres), (points,), generator=generator)
    return (centres[picks] + torch.randn(points, dim, generator=generator)).to(device)


def timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[torch.Tensor, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def fits(library: str, x: torch.Tensor, k: int, iters: int) -> tuple[Callable, Callable]:
    """(seeding only, seeding and ``iters`` Lloyd steps), each returning ``(k, d)`` centroids."""
    if library == "vqlab":
        return (lambda: cluster.kmeans(x, k, iters=0)), (lambda: cluster.kmeans(x, k, iters=iters))
    if library == "peer":
        from vector_quantize_pytorch.vector_quantize_pytorch import batched_sample_vectors, kmeans

        # its seeding is its sample_fn (kmeans itself refuses num_iters=0)
        return (lambda: batched_sample_vectors(x[None], k)[0]), (lambda: kmeans(x[None], k, num_iters=iters)[0][0])
    from sklearn.cluster import KMeans

    points = x.cpu().numpy()

    def fit(steps: int) -> torch.Tensor:
        # max_iter=0 is refused: seeding alone is what kmeans_plusplus returns
        if steps == 0:
            from sklearn.cluster import kmeans_plusplus

            return torch.from_numpy(kmeans_plusplus(points, k, random_state=0)[0])
        model = KMeans(k, init="k-means++", n_init=1, max_iter=steps, tol=0.0, random_state=0, algorithm="lloyd")
        return torch.from_numpy(model.fit(points).cluster_centers_)

    return (lambda: fit(0)), (lambda: fit(iters))


def measure(library: str, x: torch.Tensor, k: int, iters: int, device: str) -> dict:
    row = {"library": library, "codes": k, "points": x.shape[0], "dim": x.shape[1], "iters": iters}
    seeding, whole = fits(library, x, k, iters)
    torch.manual_seed(0)  # the peer draws its seeds from the global generator
    cuda = device.startswith("cuda")
    try:
        _, row["seeding_s"] = timed(seeding, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        centroids, row["fit_s"] = timed(whole, device)
        if cuda:
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    except (RuntimeError, MemoryError, ModuleNotFoundError) as err:  # out of memory, the peer missing
        return row | {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    row["inertia"] = float(cluster.inertia(x, centroids.to(x)).item()) / x.shape[0]
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| codes | points | library | seeding s | fit s | fit time / peer | inertia | inertia / peer | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    peers = {r["codes"]: r for r in rows if r["library"] == "peer" and "error" not in r}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['codes']} | {row['points']} | {row['library']} | {row['error']} ||||||")
            continue
        peer = peers.get(row["codes"])
        time_ratio = f"{row['fit_s'] / peer['fit_s']:.2f}" if peer else "—"
        inertia_ratio = f"{row['inertia'] / peer['inertia']:.3f}" if peer else "—"
        memory = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "—"
        lines.append(
            f"| {row['codes']} | {row['points']} | {row['library']} | {row['seeding_s']:.2f} | {row['fit_s']:.2f} "
            f"| {time_ratio} | {row['inertia']:.4f} | {inertia_ratio} | {memory} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python benchmarks/kmeans.py", description=__doc__.splitlines()[0])
    parser.add_argument("--codes", nargs="+", type=int, default=[1024, 16384, 65536] if cuda else [256, 1024, 4096])
    parser.add_argument("--points", type=int, default=65536 if cuda else 16384)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--libraries", nargs="+", default=["vqlab", "peer", "sklearn"], choices=["vqlab", "peer", "sklearn"]
    )
    parser.add_argument("--sklearn-max", type=int, default=4096, help="largest K given to scikit-learn (CPU only)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if min(args.codes) < 1 or max(args.codes) > args.points or args.iters < 0:
        parser.error("each of --codes must be in [1, --points], and --iters >= 0")
    from tqdm import tqdm

    x = blobs(args.points, args.dim, args.device)
    jobs = [
        (library, k) for k in args.codes for library in args.libraries if library != "sklearn" or k <= args.sklearn_max
    ]
    where = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    rows = []
    for library, k in tqdm(jobs, desc="kmeans"):
        rows.append(measure(library, x, k, args.iters, args.device))
        if args.out:  # after every row, so that a run stopped part-way keeps the rows it finished
            args.out.parent.mkdir(parents=True, exist_ok=True)
            result = {"machine": where, "torch": torch.__version__, "rows": rows}
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{args.points} points of dimension {args.dim}, {args.iters} Lloyd steps, on {where}, torch {torch.__version__}"
    )
    print(table(rows))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
