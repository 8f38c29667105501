"""Hierarchical k-means versus radix decomposition: ``python -m analysis.decomposition``.

The seed study asked: "Is the main reason FSQ works hierarchical decomposition? K-means ->
hierarchical k-means, (n·m, d) -> (n+m, d); map the input to one number in [0, M-1], then radix
decomposition." This study fits every way of spending a budget of K codes on the same latents and
measures them on held-out latents of the same source:

- ``flat``: k-means with K centroids (K·d parameters);
- ``tree``: two-level tree k-means, n parents and m children inside each parent, n·m = K
  (n + n·m centroids; a child depends on its parent);
- ``residual``: two-stage residual k-means with a shared second stage, n + m = the note's
  "(n·m, d) -> (n+m, d)": ``x ≈ c1[a] + c2[b]``;
- ``product``: k-means over two halves of the dimensions, n and m centroids;
- ``scalar``: a 1-D k-means (Lloyd-Max) grid per dimension, levels per dimension multiplying to K
  (a learned, non-uniform FSQ grid);
- ``uniform_grid``: the same levels evenly spaced over each dimension (FSQ's grid), over the range
  that fits the training latents best;
- ``radix``: the radix scheme of the note: project onto the first principal direction, cut the
  scalar into K equal-mass bins (one number in [0, K-1]), decode a bin as the mean of its training
  latents, and write the number as digits;
- ``radix_learned``: the same with a learned projection: a small MLP maps a latent to one bounded
  scalar, rounded to K levels (straight through), trained with an MLP decoder to reconstruct the
  latent; a level then decodes as the mean of its training latents. Where the principal direction
  is a line through the latents, this is a curve, so it can follow latents a line cannot.

Two-level codes have radices ``(m, n)`` (digit 0 the child or second stage), per the index spec.
Each scheme reports distortion (MSE per element), usage and entropy of its held-out codes, stored
parameters, fit and encode seconds, and, for a trained run's latents, the L1 of the run's decoder
applied to the reconstructed latents. k-means is ``vqlab.cluster.kmeans`` (torch; GPU when the
latents are there): ``LLOYD_ITERS`` Lloyd steps, or, above ``MINIBATCH_ABOVE`` training latents,
``MINIBATCH_EPOCHS`` mini-batch passes. A budget where a k-means stage would get fewer than ``min_points`` training
latents per centroid is left out (missing, never 0): those centroids would memorise their points.

Sources: ``gaussian``, ``uniform`` and ``mixture`` (8 Gaussian clusters) synthetic controls, and
``run:<run folder>``: the pre-quantization latents of a trained autoencoder on its training crops
(fit) and validation crops (held out).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.runs import label, study_arguments
from vqlab import tables
from vqlab.cluster import kmeans, nearest
from vqlab.codes import digits_to_index, index_to_digits, perplexity
from vqlab.evaluators.codebook import miller_madow_bits
from vqlab.runfolder import CONFIG_FILE, RunFolder

SCHEMES = ("flat", "tree", "residual", "product", "scalar", "uniform_grid", "radix", "radix_learned")
SYNTHETIC = ("gaussian", "uniform", "mixture")
LLOYD_ITERS = 20
MINIBATCH_ABOVE = 2**16  # training latents above which k-means takes mini-batch passes: a Lloyd step is M x K
MINIBATCH_EPOCHS, MINIBATCH_SIZE = 5, 2**13
LEARNED_STEPS, LEARNED_BATCH, LEARNED_HIDDEN, LEARNED_LR = 2000, 4096, 64, 3e-3  # radix_learned's fit
SMOKE = {
    "bits": [4, 6],
    "train_count": 1024,
    "held_out_count": 512,
    "learned_steps": 50,
}  # seconds: --smoke and the notebook's smoke
SETTINGS = ("bits", "dim", "train_count", "held_out_count", "min_points", "learned_steps")  # logged as MLflow params
RANGE_STEPS = torch.linspace(1.0, 0.05, 20).tolist()  # the uniform grid's candidate ranges, as shares of min..max


@dataclass
class Codec:
    """A fitted scheme: latents ``(M, d)`` -> digits ``(M, G)`` over ``radices`` -> latents."""

    radices: tuple[int, ...]
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    parameters: int  # floats stored to decode


@dataclass(frozen=True)
class FitSettings:
    """How every scheme is fitted: ``min_points`` training latents per centroid (or bin) at least,
    and the optimizer steps of ``radix_learned``'s projection."""

    min_points: int = 8
    learned_steps: int = LEARNED_STEPS


class TooFewPoints(ValueError):
    """A k-means stage would get fewer than ``min_points`` training latents per centroid."""


def split(bits: int) -> tuple[int, int]:
    """``K = 2^bits`` as ``(n, m)``, n·m = K, n >= m: the parents (or first stage) and children."""
    return 2 ** math.ceil(bits / 2), 2 ** (bits // 2)


def cluster(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    if x.shape[0] > MINIBATCH_ABOVE:
        return kmeans(x, k, iters=MINIBATCH_EPOCHS, seed=seed, batch_size=MINIBATCH_SIZE)
    return kmeans(x, k, iters=LLOYD_ITERS, seed=seed)


def fit_kmeans(x: torch.Tensor, k: int, min_points: int, seed: int = 0) -> torch.Tensor:
    if x.shape[0] < k * min_points:
        raise TooFewPoints(f"{k} centroids need {k * min_points} latents, got {x.shape[0]}")
    return cluster(x, k, seed)


def flat(x: torch.Tensor, bits: int, fit: FitSettings) -> Codec:
    centroids = fit_kmeans(x, 2**bits, fit.min_points)
    return Codec(
        radices=(2**bits,),
        encode=lambda z: nearest(z, centroids)[:, None],
        decode=lambda digits: centroids[digits[:, 0]],
        parameters=centroids.numel(),
    )


def tree(x: torch.Tensor, bits: int, fit: FitSettings) -> Codec:
    n, m = split(bits)
    if x.shape[0] < n * m * fit.min_points:
        raise TooFewPoints(f"{n} x {m} children need {n * m * fit.min_points} latents, got {x.shape[0]}")
    parents = fit_kmeans(x, n, fit.min_points)  # (n, d)
    assignment = nearest(x, parents)
    # a parent holding fewer than m latents keeps copies of its centroid: its children cannot be told apart
    children = torch.stack(
        [
            cluster(x[assignment == p], m, seed=p) if (assignment == p).sum() >= m else parents[p].repeat(m, 1)
            for p in range(n)
        ]
    )  # (n, m, d)

    def encode(z: torch.Tensor) -> torch.Tensor:
        parent = nearest(z, parents)
        child = torch.empty_like(parent)
        for p in parent.unique().tolist():
            chosen = parent == p
            child[chosen] = nearest(z[chosen], children[p])
        return torch.stack([child, parent], dim=-1)

    return Codec(
        radices=(m, n),
        encode=encode,
        decode=lambda digits: children[digits[:, 1], digits[:, 0]],
        parameters=parents.numel() + children.numel(),
    )


def residual(x: torch.Tensor, bits: int, fit: FitSettings) -> Codec:
    n, m = split(bits)
    first = fit_kmeans(x, n, fit.min_points)
    second = fit_kmeans(x - first[nearest(x, first)], m, fit.min_points)

    def encode(z: torch.Tensor) -> torch.Tensor:
        a = nearest(z, first)
        return torch.stack([nearest(z - first[a], second), a], dim=-1)

    return Codec(
        radices=(m, n),
        encode=encode,
        decode=lambda digits: first[digits[:, 1]] + second[digits[:, 0]],
        parameters=first.numel() + second.numel(),
    )


def product(x: torch.Tensor, bits: int, fit: FitSettings) -> Codec:
    if x.shape[1] < 2:
        raise TooFewPoints("product quantization needs at least 2 dimensions")
    n, m = split(bits)
    half = x.shape[1] // 2
    left, right = fit_kmeans(x[:, :half], n, fit.min_points), fit_kmeans(x[:, half:], m, fit.min_points)
    return Codec(
        radices=(n, m),
        encode=lambda z: torch.stack([nearest(z[:, :half], left), nearest(z[:, half:], right)], dim=-1),
        decode=lambda digits: torch.cat([left[digits[:, 0]], right[digits[:, 1]]], dim=-1),
        parameters=left.numel() + right.numel(),
    )


def levels_per_dim(x: torch.Tensor, bits: int) -> list[int]:
    """``bits`` shared over the dimensions as evenly as possible, the extra bits to the dimensions
    of largest variance; a dimension with 0 bits has 1 level (its training mean)."""
    d = x.shape[1]
    order = x.var(0).argsort(descending=True).tolist()
    shares = [bits // d + (1 if rank < bits % d else 0) for rank in range(d)]
    levels = [0] * d
    for rank, dim in enumerate(order):
        levels[dim] = 2 ** shares[rank]
    return levels


def grid_codec(values: list[torch.Tensor]) -> Codec:
    """Per-dimension value tables -> a codec whose digits are the nearest value of each coded
    dimension (tables of one value are constants, not digits)."""
    coded = [i for i, table in enumerate(values) if len(table) > 1]

    def encode(z: torch.Tensor) -> torch.Tensor:
        return torch.stack([(z[:, i, None] - values[i]).abs().argmin(-1) for i in coded], dim=-1)

    def decode(digits: torch.Tensor) -> torch.Tensor:
        columns = [table.expand(digits.shape[0]) if len(table) == 1 else None for table in values]
        for column, i in enumerate(coded):
            columns[i] = values[i][digits[:, column]]
        return torch.stack(columns, dim=-1)

    return Codec(
        radices=tuple(len(values[i]) for i in coded),
        encode=encode,
        decode=decode,
        parameters=sum(len(t) for t in values),
    )


def scalar(x: torch.Tensor, bits: int, fit: FitSettings) -> Codec:
    values = []
    for i, count in enumerate(levels_per_dim(x, bits)):
        column = x[:, i : i + 1]
        values.append(column.mean(0) if count == 1 else fit_kmeans(column, count, fit.min_points)[:, 0].sort().values)
    return grid_codec(values)


def uniform_grid(x: torch.Tensor, bits: int, fit: FitSettings) -> Codec:
    """FSQ's grid: ``L`` evenly spaced values per dimension. FSQ's encoder learns where its bounded
    range sits; here each dimension's range is the best of ``RANGE_STEPS`` shrinkings of its training
    range (about its centre) on the training MSE, from the full range (min and max are levels) down."""
    values = []
    for i, count in enumerate(levels_per_dim(x, bits)):
        column = x[:, i]
        if count == 1:
            values.append(column.mean(0, keepdim=True))
            continue
        centre, half = (column.max() + column.min()) / 2, (column.max() - column.min()) / 2
        grids = [torch.linspace(centre - f * half, centre + f * half, count) for f in RANGE_STEPS]
        errors = [(column[:, None] - grid).abs().min(-1).values.square().mean() for grid in grids]
        values.append(grids[int(torch.stack(errors).argmin())])
    codec = grid_codec(values)
    codec.parameters = 2 * x.shape[1]  # a range per dimension is all a uniform grid stores
    return codec


def radix(x: torch.Tensor, bits: int, fit: FitSettings) -> Codec:
    """One number per latent: the first principal coordinate cut into ``K`` equal-mass bins."""
    k = 2**bits
    if x.shape[0] < k * fit.min_points:
        raise TooFewPoints(f"{k} bins need {k * fit.min_points} latents, got {x.shape[0]}")
    mean = x.mean(0)
    direction = torch.linalg.svd(x - mean, full_matrices=False).Vh[0]  # (d,)
    projected = (x - mean) @ direction
    edges = projected.quantile(torch.linspace(0, 1, k + 1, dtype=x.dtype)[1:-1].to(x.device))  # (k - 1,)
    index = torch.bucketize(projected, edges)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, index, x)
    counts = torch.bincount(index, minlength=k).to(x.dtype)[:, None]
    # an empty bin (ties in the projection) decodes to the point on the axis at its lower edge
    fallback = mean + torch.cat([edges[:1], edges])[:, None] * direction
    means = torch.where(counts > 0, sums / counts.clamp_min(1), fallback)  # (k, d)
    n, m = split(bits)
    return Codec(
        radices=(m, n),
        encode=lambda z: index_to_digits(torch.bucketize((z - mean) @ direction, edges), (m, n)),
        decode=lambda digits: means[digits_to_index(digits, (m, n))],
        parameters=means.numel() + edges.numel() + 2 * x.shape[1],
    )


def mlp(inputs: int, outputs: int) -> torch.nn.Sequential:
    hidden = LEARNED_HIDDEN
    layers = [torch.nn.Linear(inputs, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(hidden, outputs))


def radix_learned(x: torch.Tensor, bits: int, fit: FitSettings) -> Codec:
    """One number per latent from a learned projection: ``round(tanh(f(x))·h) + h`` with
    ``h = (K − 1)/2`` and ``f`` an MLP, trained on the standardised training latents together with
    an MLP decoder of the rounded level (straight-through rounding, MSE, Adam, ``fit.learned_steps``
    steps). A level decodes as the mean of its training latents, or as the decoder's output where
    no training latent fell."""
    k = 2**bits
    if x.shape[0] < k * fit.min_points:
        raise TooFewPoints(f"{k} levels need {k * fit.min_points} latents, got {x.shape[0]}")
    d, half = x.shape[1], (k - 1) / 2
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    standard = (x - mean) / std
    with torch.random.fork_rng(devices=[]):  # the same initial weights on every call, global RNG untouched
        torch.manual_seed(0)
        encoder, decoder = mlp(d, 1).to(x.device), mlp(1, d).to(x.device)
    generator = torch.Generator(device=x.device).manual_seed(0)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LEARNED_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, fit.learned_steps)
    for _ in range(fit.learned_steps):
        batch = standard[torch.randint(x.shape[0], (LEARNED_BATCH,), generator=generator, device=x.device)]  # (b, d)
        level = torch.tanh(encoder(batch)) * half  # (b, 1) in [-h, h]
        rounded = level + (level.round() - level).detach()
        loss = (decoder(rounded / half) - batch).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    @torch.no_grad()
    def index(z: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(encoder((z - mean) / std)) * half).round().add(half).long()[:, 0]  # (M,) in [0, K-1]

    with torch.no_grad():
        assigned = index(x)
        sums = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, assigned, x)
        counts = torch.bincount(assigned, minlength=k).to(x.dtype)[:, None]
        levels = (torch.arange(k, device=x.device, dtype=x.dtype)[:, None] - half) / half  # (k, 1)
        table = torch.where(counts > 0, sums / counts.clamp_min(1), decoder(levels) * std + mean)  # (k, d)
    n, m = split(bits)
    return Codec(
        radices=(m, n),
        encode=lambda z: index_to_digits(index(z), (m, n)),
        decode=lambda digits: table[digits_to_index(digits, (m, n))],
        parameters=table.numel() + sum(p.numel() for p in encoder.parameters()) + 2 * d,
    )


FIT = {
    "flat": flat,
    "tree": tree,
    "residual": residual,
    "product": product,
    "scalar": scalar,
    "uniform_grid": uniform_grid,
    "radix": radix,
    "radix_learned": radix_learned,
}


def code_statistics(digits: torch.Tensor, radices: tuple[int, ...]) -> dict[str, float]:
    """Usage (distinct codes / K) and entropy in bits of the codes' flat-index histogram: plug-in
    (``entropy_bits``) and Miller–Madow corrected (``measured_bits``, the rate the runs report)."""
    counts = torch.bincount(digits_to_index(digits, radices), minlength=math.prod(radices))
    return {
        "usage": (counts > 0).double().mean().item(),
        "entropy_bits": math.log2(perplexity(counts).item()),
        "measured_bits": float(miller_madow_bits(counts.cpu().numpy())),
    }


def measure(
    scheme: str,
    train: torch.Tensor,
    held_out: torch.Tensor,
    bits: int,
    fit: FitSettings = FitSettings(),
    decoded_l1: Callable[[torch.Tensor], float] | None = None,
) -> dict[str, float | str | int]:
    """One scheme at one budget: fitted on ``train``, measured on ``held_out``; the metrics of a
    budget the scheme cannot fit (``TooFewPoints``) are NaN."""
    row: dict[str, float | str | int] = {"scheme": scheme, "bits": bits}
    started = time.perf_counter()
    try:
        codec = FIT[scheme](train, bits, fit)
    except TooFewPoints:
        return row | {
            "mse": math.nan,
            "usage": math.nan,
            "entropy_bits": math.nan,
            "measured_bits": math.nan,
            "parameters": math.nan,
        }
    fitted = time.perf_counter()
    digits = codec.encode(held_out)
    encoded = time.perf_counter()
    approximation = codec.decode(digits)
    row |= {"mse": (approximation - held_out).square().mean().item(), **code_statistics(digits, codec.radices)}
    row |= {"parameters": codec.parameters, "fit_s": fitted - started, "encode_s": encoded - fitted}
    if decoded_l1 is not None:
        row["decoded_l1"] = decoded_l1(approximation)
    return row


def synthetic(name: str, count: int, dim: int, seed: int) -> torch.Tensor:
    """``(count, dim)`` latents of a control: standard Gaussian, uniform on [-1, 1], or a mixture of
    8 Gaussians (std 0.1) around centres drawn from the standard Gaussian (fixed by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    if name == "gaussian":
        return torch.randn(count, dim, generator=generator)
    if name == "uniform":
        return torch.rand(count, dim, generator=generator) * 2 - 1
    if name == "mixture":
        centres = torch.randn(8, dim, generator=torch.Generator().manual_seed(0))
        which = torch.randint(8, (count,), generator=generator)
        return centres[which] + 0.1 * torch.randn(count, dim, generator=generator)
    raise ValueError(f"unknown synthetic source {name!r}; one of {', '.join(SYNTHETIC)}")


def study(
    train: torch.Tensor,
    held_out: torch.Tensor,
    bits: list[int],
    schemes: tuple[str, ...] = SCHEMES,
    fit: FitSettings = FitSettings(),
    decoded_l1: Callable[[torch.Tensor], float] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Every scheme at every budget (``measure``), as rows."""
    from tqdm import tqdm

    pairs = [(scheme, b) for b in bits for scheme in schemes]
    return [
        measure(scheme, train, held_out, b, fit, decoded_l1)
        for scheme, b in tqdm(pairs, desc="decomposition", disable=not progress)
    ]


# --- latents of a trained run ---------------------------------------------------------------------
@dataclass
class RunLatents:
    train: torch.Tensor  # (M, D) relaxed tokens of the training crops, to fit
    held_out: torch.Tensor  # (M', D) relaxed tokens of the validation crops, to measure
    decoded_l1: Callable[[torch.Tensor], float]  # held-out tokens' approximation -> L1 of the decoded images
    trained: torch.Tensor | None = None  # (M', D) the run's own z_q of the held-out tokens (a discrete run)
    trained_bits: float = math.nan  # log2 of the run's codebook size


@torch.no_grad()
def run_latents(run_dir: str | Path, train_count: int, device: str = "cpu") -> RunLatents:
    """The latents of a run's newest checkpoint on its first ``train_count`` training crops and on
    its validation crops: its quantizer's relaxed values (``Quantizer.relaxed``: for FSQ the
    bounded values before rounding, for VQ the latents as compared with the codes, for the
    continuous model the tokens), which its decoder reads as it reads ``z_q``. With the decoder
    that measures an approximation of the validation latents as L1 on [0, 1] images (as
    ``val/l1``), and, for a discrete run, its own ``z_q`` of the validation latents."""
    from analysis.runs import crops, trained

    cfg, model = trained(run_dir, device)
    quantizer = model.quantizer

    def relaxed(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        tokens, grid = model.tokens(images)
        return quantizer.relaxed(tokens), tokens, grid

    train = torch.cat([relaxed(batch)[0] for batch in crops(cfg, "train", train_count, device).split(256)])
    images = crops(cfg, "val", device=device)
    parts = [relaxed(batch) for batch in images.split(256)]
    held_out, grid = torch.cat([r for r, _, _ in parts]), parts[0][2]
    own, bits = None, math.nan
    if quantizer.discrete:
        own = torch.cat([quantizer(tokens).z_q.float() for _, tokens, _ in parts]).flatten(0, 1)
        bits = sum(math.log2(r) for r in quantizer.radices)

    @torch.no_grad()
    def decoded_l1(approximation: torch.Tensor) -> float:
        z = approximation.reshape(held_out.shape).to(model.post_quant.weight.dtype)
        errors = [
            (model.detokenize(chunk, grid).clamp(-1, 1) - target).abs().mean((1, 2, 3)) / 2
            for chunk, target in zip(z.split(256), images.split(256), strict=True)
        ]
        return torch.cat(errors).mean().item()

    return RunLatents(train.flatten(0, 1), held_out.flatten(0, 1), decoded_l1, own, bits)


def trained_row(latents: RunLatents) -> dict:
    """The run's own quantizer on its held-out latents, as a row beside the schemes (``trained``)."""
    own = latents.trained
    return {
        "scheme": "trained",
        "bits": latents.trained_bits,
        "mse": (own - latents.held_out).square().mean().item(),
        "decoded_l1": latents.decoded_l1(own),
    }


# --- the end-to-end counterpart: the schemes trained with the model ---------------------------------
TRAINED_SCHEME = {
    "vq": "flat",
    "vq_ema": "flat",
    "fsq": "uniform_grid",
    "rvq": "residual",
    "product": "product",
    "radix": "radix",
}  # quantizer -> the scheme above it trains end to end (the ``studies`` sweep holds each at 2^6, 2^10, 2^14)


def trained_rows(runs: list) -> list[dict]:
    """One row per run (``analysis.utilization.CodebookRun``) whose quantizer is one of the schemes
    trained end to end (``TRAINED_SCHEME``): the scheme, the run, its budget in bits (log2 of the
    codebook size of its code histogram), its last ``val/l1`` and its validation codes' usage and
    entropy. Runs of other quantizers, and runs without codes, have no row."""
    from analysis.utilization import utilization

    rows = []
    for run in runs:
        if run.method not in TRAINED_SCHEME or run.histogram is None:
            continue
        size = run.histogram.codebook_size
        used = utilization(run.histogram.counts, size)
        rows.append(
            {
                "scheme": TRAINED_SCHEME[run.method],
                "run": run.name,
                "bits": math.log2(size),
                "l1": run.folder.last_metrics().get("val/l1", math.nan),
                "usage": used["usage"],
                "entropy_bits": used["effective_bits"],
            }
        )
    return rows


def trained_markdown(rows: list[dict]) -> str:
    """Validation L1 per trained scheme (rows) and budget rounded to whole bits (columns)."""
    budgets = sorted({round(row["bits"]) for row in rows})
    value = {(row["scheme"], round(row["bits"])): row["l1"] for row in rows}
    schemes = dict.fromkeys(row["scheme"] for row in rows)
    cells = ([scheme] + [tables.cell(value.get((scheme, b), math.nan), ".4f") for b in budgets] for scheme in schemes)
    return tables.markdown(["trained", *(f"~{b} bits" for b in budgets)], cells)


def trained_figure(rows: list[dict], title: str):
    """Validation L1 against bits per scheme trained end to end (radix dashed, as in ``figure``)."""
    import pandas as pd
    from matplotlib.figure import Figure

    made = Figure(figsize=(5.5, 4), layout="constrained")
    ax = made.subplots()
    for scheme, points in pd.DataFrame(rows).sort_values("bits").groupby("scheme", sort=False):
        ax.plot(points["bits"], points["l1"], marker="o", label=scheme, linestyle="--" if scheme == "radix" else "-")
    ax.set(xlabel="bits per token (log2 K)", ylabel="validation L1", yscale="log", title=title)
    ax.legend(fontsize="small")
    return made


def analyse_trained(experiment: str, out: Path, tracking_uri: str) -> tuple[list[dict], list[Path]]:
    """The end-to-end counterpart of the study over the MLflow experiment ``experiment`` (a sweep's
    variants): rows, and ``table.csv``, ``table.md`` and ``end_to_end.png`` in ``out/<experiment>``."""
    import pandas as pd

    from analysis.utilization import tracked_runs

    rows = trained_rows(tracked_runs(experiment, tracking_uri))
    if not rows:
        raise ValueError(f"no run of {experiment} trains one of {', '.join(sorted(TRAINED_SCHEME))} with codes")
    folder = out / experiment
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "table.csv", index=False)
    (folder / "table.md").write_text(trained_markdown(rows) + "\n")
    trained_figure(rows, f"{experiment}: trained end to end").savefig(folder / "end_to_end.png", dpi=120)
    return rows, [folder / "table.csv", folder / "table.md", folder / "end_to_end.png"]


# --- figures, MLflow and the command line ---------------------------------------------------------
def figure(rows: list[dict], title: str):
    """MSE against bits (log scale) per scheme, and decoded L1 against bits when measured."""
    import pandas as pd
    from matplotlib.figure import Figure

    table = pd.DataFrame(rows)
    panels = ["mse"] + (["decoded_l1"] if "decoded_l1" in table and table["decoded_l1"].notna().any() else [])
    made = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
    for ax, column in zip(made.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for scheme, points in table.dropna(subset=[column]).groupby("scheme", sort=False):
            style = {"trained": {"marker": "*", "markersize": 14, "linestyle": "none"}, "radix": {"linestyle": "--"}}
            ax.plot(points["bits"], points[column], **({"marker": "o"} | style.get(scheme, {})), label=scheme)
        ax.set(xlabel="bits per latent (log2 K)", ylabel=column, yscale="log", title=f"held-out {column}")
        ax.legend(fontsize="small")
    made.suptitle(title)
    return made


def log_to_mlflow(rows: list[dict], params: dict, files: list[Path], root: Path, source: str, uri: str = "") -> str:
    """One MLflow run of experiment ``decomposition`` per source: ``<metric>/<scheme>`` at step = bits."""
    from analysis.runs import log_study

    numeric = ("mse", "usage", "entropy_bits", "measured_bits", "parameters", "fit_s", "encode_s", "decoded_l1")
    metrics = [
        {"step": round(row["bits"]), **{f"{k}/{row['scheme']}": row[k] for k in numeric if k in row}} for row in rows
    ]
    return log_study("decomposition", source, params, metrics, files, root, uri)


def log_trained_to_mlflow(rows: list[dict], files: list[Path], root: Path, experiment: str, uri: str = "") -> str:
    """One MLflow run ``trained:<experiment>`` of experiment ``decomposition``: ``l1/<scheme>`` at step = bits."""
    from analysis.runs import log_study

    metrics = [{"step": round(row["bits"]), f"l1/{row['scheme']}": row["l1"]} for row in rows]
    params = {"experiment": experiment, "runs": len(rows)}
    return log_study("decomposition", f"trained:{experiment}", params, metrics, files, root, uri)


def markdown(rows: list[dict]) -> str:
    """Held-out MSE per scheme (rows) and budget (columns, the run's own quantizer under the nearest
    whole number of bits); ``—`` where a budget was not fitted."""
    bits = sorted({round(row["bits"]) for row in rows})
    schemes = dict.fromkeys(row["scheme"] for row in rows)
    value = {(row["scheme"], round(row["bits"])): row["mse"] for row in rows}
    cells = ([scheme] + [tables.cell(value.get((scheme, b), math.nan), ".4g") for b in bits] for scheme in schemes)
    return tables.markdown(["scheme", *(f"{b} bits" for b in bits)], cells)


def analyse(
    source: str,
    out: Path,
    bits: list[int],
    schemes: tuple[str, ...] = SCHEMES,
    dim: int = 4,
    train_count: int = 65536,
    held_out_count: int = 16384,
    min_points: int = 8,
    learned_steps: int = LEARNED_STEPS,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[list[dict], list[Path]]:
    """The study on one source: rows, and ``table.csv``, ``table.md`` and ``distortion.png`` written
    to ``out/<source>`` (a run source by ``analysis.runs.label``: ``<variant>/seed<k>`` for a seeded
    sweep's run). For a run, ``train_count`` counts crops."""
    import pandas as pd

    latents = None
    if source.startswith("run:"):
        latents = run_latents(source.removeprefix("run:"), train_count, device)
        train, held_out, decoded = latents.train, latents.held_out, latents.decoded_l1
    else:
        train = synthetic(source, train_count, dim, seed=1).to(device)
        held_out = synthetic(source, held_out_count, dim, seed=2).to(device)
        decoded = None
    rows = study(train, held_out, bits, schemes, FitSettings(min_points, learned_steps), decoded, progress)
    if latents is not None and latents.trained is not None:
        rows.append(trained_row(latents))
    folder = out / (label(source.removeprefix("run:")) if source.startswith("run:") else source)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "table.csv", index=False)
    (folder / "table.md").write_text(markdown(rows) + "\n")
    title = f"{source}: {train.shape[0]} fitted, {held_out.shape[0]} held-out latents of dim {train.shape[1]}"
    figure(rows, title).savefig(folder / "distortion.png", dpi=120)
    return rows, [folder / "table.csv", folder / "table.md", folder / "distortion.png"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.decomposition",
        description="Hierarchical k-means versus radix decomposition at matched code budgets.",
    )
    parser.add_argument(
        "--sources", nargs="+", help=f"{', '.join(SYNTHETIC)} or run:<folder> (default: the three synthetic ones)"
    )
    parser.add_argument(
        "--trained", nargs="+", default=[], help="MLflow experiments (sweeps) whose tokenizers train the schemes"
    )
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 6, 8, 10, 12, 14, 16])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--dim", type=int, default=4, help="dimension of the synthetic latents")
    parser.add_argument("--train-count", type=int, default=65536, help="latents fitted (synthetic), crops (runs)")
    parser.add_argument("--held-out-count", type=int, default=16384, help="held-out synthetic latents")
    parser.add_argument("--min-points", type=int, default=8, help="training latents per centroid, at least")
    parser.add_argument("--learned-steps", type=int, default=LEARNED_STEPS, help="radix_learned's training steps")
    study_arguments(parser, "decomposition")
    parser.add_argument("--smoke", action="store_true", help="2 budgets, few latents: seconds")
    args = parser.parse_args(argv)
    if args.sources is None:
        args.sources = [] if args.trained else list(SYNTHETIC)
    if args.smoke:
        vars(args).update(SMOKE)
    counts = (args.dim, args.train_count, args.held_out_count, args.min_points, args.learned_steps)
    if any(b < 2 for b in args.bits) or min(counts) < 1:
        parser.error("--bits must be >= 2; --dim, --train-count, --held-out-count, --min-points, --learned-steps >= 1")
    unknown = [s for s in args.sources if s not in SYNTHETIC and not s.startswith("run:")]
    if unknown:
        parser.error(f"unknown sources {unknown}: use {', '.join(SYNTHETIC)} or run:<folder>")
    missing = [s for s in args.sources if s.startswith("run:") and not RunFolder(Path(s[4:])).has_config()]
    if missing:
        parser.error(f"no run folder ({CONFIG_FILE}) at {', '.join(s[4:] for s in missing)}")
    args.out = args.out or args.root / "decomposition"
    for source in args.sources:
        rows, files = analyse(
            source,
            args.out,
            args.bits,
            tuple(args.schemes),
            args.dim,
            args.train_count,
            args.held_out_count,
            args.min_points,
            args.learned_steps,
            args.device,
        )
        print(f"## {source}: held-out MSE\n{markdown(rows)}")
        if not args.no_mlflow:
            params = {"source": source, **{key: getattr(args, key) for key in SETTINGS}}
            run_id = log_to_mlflow(rows, params, files, args.root, source, args.tracking_uri or "")
            print(f"MLflow run {run_id} (experiment decomposition)")
        print(f"wrote {', '.join(str(p) for p in files)}")
    for experiment in args.trained:
        if main_trained(experiment, args) != 0:
            return 2
    return 0


def main_trained(experiment: str, args: argparse.Namespace) -> int:
    from vqlab.errors import UserError
    from vqlab.report import store

    uri = store(args.tracking_uri, args.root)
    try:
        rows, files = analyse_trained(experiment, args.out, uri)
    except (UserError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"## {experiment}: validation L1, trained end to end\n{trained_markdown(rows)}")
    if not args.no_mlflow:
        run_id = log_trained_to_mlflow(rows, files, args.root, experiment, uri)
        print(f"MLflow run {run_id} (experiment decomposition)")
    print(f"wrote {', '.join(str(p) for p in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
