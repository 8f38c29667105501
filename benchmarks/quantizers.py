"""Each vqlab quantizer beside the matching class of vector-quantize-pytorch, in one run.

    python benchmarks/quantizers.py                        # CUDA when present (fp32 and bf16), else CPU (fp32)
    python benchmarks/quantizers.py --cases "vq K=65536" --dtypes fp32 bf16 --out runs/bench/quantizers.json

A step is what training does with a quantizer: forward on ``(1, tokens, D)`` latents, then backward
of ``(z_q · w).sum()`` plus every loss it returns; the EMA and usage updates run where each library
runs them (the peer inside forward, vqlab at the next training forward), so both are timed. Each
row's memory is its own: the peak over the timed steps minus what was allocated before them
(CUDA: ``max_memory_allocated``, reset per case, one process per library and dtype; CPU: the
growth of the process's peak resident set, ``ru_maxrss``, one process per row). Time: the median
of ``--repeats`` steps after ``--warmup``. Matching settings: no k-means init and no dead-code
re-seeding on either side, EMA decay 0.99, commitment weight 0.25, LFQ's entropy weight 0.1, SimVQ
straight through (the peer's rotation trick off). The peer is the ``bench`` extra
(``pip install -e '.[bench]'``); without it its rows say so. Prints a table with the ratio
vqlab / peer per row and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

D = 256  # the codebook quantizers' latent dimension
# name -> (vqlab quantizer and options, peer class and options, latent dimension)
CASES: dict[str, tuple[tuple[str, dict], tuple[str, dict], int]] = {}
for size in (1024, 16384, 65536):
    plain = {"codebook_size": size, "dim": D, "init": "normal", "dead_code_steps": 0}
    CASES[f"vq K={size}"] = (
        ("vq", plain),
        ("VectorQuantize", {"dim": D, "codebook_size": size, "learnable_codebook": True, "ema_update": False}),
        D,
    )
    CASES[f"vq_ema K={size}"] = (("vq_ema", plain), ("VectorQuantize", {"dim": D, "codebook_size": size}), D)
    simvq = {"codebook_size": size, "dim": D}
    CASES[f"simvq K={size}"] = (("simvq", simvq), ("SimVQ", {**simvq, "rotation_trick": False}), D)
for levels in ([8, 8, 8, 5, 5, 5], [8] * 6):
    name = "fsq " + "-".join(map(str, levels))
    CASES[name] = (("fsq", {"levels": levels}), ("FSQ", {"levels": levels}), len(levels))
for bits in (10, 14, 18):
    peer = {"dim": bits, "codebook_size": 2**bits, "entropy_loss_weight": 0.1, "commitment_loss_weight": 0.25}
    CASES[f"lfq d={bits}"] = (("lfq", {"dim": bits}), ("LFQ", peer), bits)
CASES["rvq 4 x 1024"] = (
    ("rvq", {"depth": 4, "base": {"name": "vq_ema", "codebook_size": 1024, "dim": D, "init": "normal"}}),
    ("ResidualVQ", {"dim": D, "num_quantizers": 4, "codebook_size": 1024}),
    D,
)
PEER_DEFAULTS = {"VectorQuantize": {"decay": 0.99, "commitment_weight": 0.25}, "ResidualVQ": {"decay": 0.99}}


def build(library: str, case: str) -> torch.nn.Module:
    (ours, options), (peer_class, peer_options), _ = CASES[case]
    if library == "vqlab":
        import vqlab

        if ours == "rvq":  # the stages of a benchmark never re-seed dead codes
            options = {**options, "base": {**options["base"], "dead_code_steps": 0}}
        return vqlab.quantizers.build(ours, **options)
    import vector_quantize_pytorch

    return getattr(vector_quantize_pytorch, peer_class)(**PEER_DEFAULTS.get(peer_class, {}), **peer_options)


def step(module: torch.nn.Module, library: str, x: torch.Tensor, w: torch.Tensor, dtype: str) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = module(x)
    if library == "vqlab":
        z_q, losses = out.z_q, list(out.losses.values())
    else:  # (quantized, indices[, losses]): every floating tensor after the first is a loss
        z_q, losses = out[0], [t for t in out[1:] if torch.is_tensor(t) and t.is_floating_point()]
    loss = (z_q.float() * w).sum() + sum(t.float().sum() for t in losses)
    loss.backward()


def time_case(case: str, library: str, dtype: str, tokens: int, warmup: int, repeats: int, device: str) -> dict:
    """One row: ``ms`` (median step) and ``peak_mib`` (memory of a step beyond its setup)."""
    torch.manual_seed(0)
    dim = CASES[case][2]
    module = build(library, case).to(device).train()
    x = torch.randn(1, tokens, dim, device=device, requires_grad=True)
    w = torch.randn(1, tokens, dim, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        step(module, library, x, w, dtype)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
        x.grad = None
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"ms": 1000 * statistics.median(times), "peak_mib": (peak - before) / 2**20}


def worker(cases: list[str], library: str, dtype: str, args: argparse.Namespace) -> None:
    """Print one JSON row per case as it ends; a case that fails (out of memory) is its row's
    ``error`` and the next one starts from freed memory."""
    for case in cases:
        try:
            row = time_case(case, library, dtype, args.tokens, args.warmup, args.repeats, args.device)
        except (RuntimeError, MemoryError) as err:
            row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        print(json.dumps({"case": case} | row), flush=True)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def measure(cases: list[str], library: str, dtype: str, args: argparse.Namespace) -> list[dict]:
    """``worker`` in a fresh process: one row per case; a process that dies (the peer missing, the
    host out of memory) leaves its error on the cases it had not finished."""
    command = [sys.executable, __file__, "--worker", library, dtype, "--cases", *cases]
    command += ["--tokens", str(args.tokens), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    command += ["--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    finished = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            finished[row.pop("case")] = row
    lines = (done.stderr or done.stdout).strip().splitlines()
    died = {"error": lines[-1] if lines else f"exit {done.returncode}"}
    base = {"library": library, "dtype": dtype, "tokens": args.tokens}
    return [{"case": case, **base, **finished.get(case, died)} for case in cases]


def cell(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if key in row else ("error" if "error" in row else "—")


def ratio(ours: dict, peer: dict, key: str) -> str:
    return f"{ours[key] / peer[key]:.2f}" if key in ours and key in peer and peer[key] > 0 else "—"


def table(rows: list[dict]) -> str:
    """One line per (case, dtype): each library's time and memory, and vqlab / peer."""
    lines = [
        "| case | dtype | vqlab ms | peer ms | time vqlab/peer | vqlab MiB | peer MiB | memory vqlab/peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pairs: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        pairs.setdefault((row["case"], row["dtype"]), {})[row["library"]] = row
    for (case, dtype), by in pairs.items():
        ours, peer = by.get("vqlab", {}), by.get("peer", {})
        lines.append(
            f"| {case} | {dtype} | {cell(ours, 'ms')} | {cell(peer, 'ms')} | {ratio(ours, peer, 'ms')} "
            f"| {cell(ours, 'peak_mib')} | {cell(peer, 'peak_mib')} | {ratio(ours, peer, 'peak_mib')} |"
        )
    return "\n".join(lines)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python benchmarks/quantizers.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"] if cuda else ["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--libraries", nargs="+", default=["vqlab", "peer"], choices=["vqlab", "peer"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("LIBRARY", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--tokens and --repeats must be >= 1, --warmup >= 0")
    if args.worker:
        worker(args.cases, *args.worker, args)
        return 0
    from tqdm import tqdm

    # CPU memory is a process's peak resident set, which only grows: one process per row. CUDA
    # resets its peak per case, so one process per library and dtype runs every case.
    groups = [[case] for case in args.cases] if args.device == "cpu" else [args.cases]
    jobs = [(cases, library, dtype) for cases in groups for dtype in args.dtypes for library in args.libraries]
    order = {case: i for i, case in enumerate(args.cases)}
    rows = []
    for job in tqdm(jobs, desc="quantizers"):
        rows.extend(measure(*job, args))
        rows.sort(key=lambda row: (order[row["case"]], args.dtypes.index(row["dtype"])))
        if args.out:  # after every job, so that a run stopped part-way keeps the rows it finished
            args.out.parent.mkdir(parents=True, exist_ok=True)
            result = {"machine": machine(args.device), "torch": torch.__version__, "rows": rows}
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.tokens} tokens per step on {machine(args.device)}, torch {torch.__version__}")
    print(table(rows))
    for row in rows:
        if "error" in row:
            print(f"{row['case']} {row['library']} {row['dtype']}: {row['error']}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
