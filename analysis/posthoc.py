"""Post-hoc quantizers against co-trained tokenizers, seed by seed: ``python -m analysis.posthoc <experiment>``.

The seed study's first question, "is the main reason FSQ works hierarchical decomposition?", asks
two things of a budget of K codes: how its decomposition (flat, two-level tree, residual, product,
a grid, one scalar cut into digits) spends it, and whether it matters that the encoder and decoder
were trained against it. ``analysis.decomposition`` answers the first on one set of latents; this
study puts both side by side over the seeds of a sweep whose tokenizers train the same schemes end
to end (``python -m vqlab.sweep decompositions``), each seed's runs trained together:

- **post-hoc**: per seed, every scheme of ``analysis.decomposition`` is fitted on the latents of
  that seed's continuous model (the sweep's ``identity`` floor at ``width``; its first
  ``train_count`` training crops) and read through that model's decoder on the validation crops:
  decoded L1, the number every tokenizer is read on, beside latent MSE, what k-means minimises,
  and the Miller–Madow entropy of the held-out codes (the measured rate);
- **co-trained**: per seed, every tokenizer of the sweep that trains one of the schemes
  (``scheme_of``) with its validation L1, measured bits, and quantization gap to the continuous
  model of its own width (the report's ``floor`` pairing: the radix tokenizer's is the
  1-dimensional model);
- over the seeds: each row's mean and 95% t interval (``vqlab.report.half_width``); paired by
  seed, co-trained minus post-hoc per scheme, and each scheme minus flat on each side
  (``vqlab.report.compare``, with its verdict); the post-hoc schemes whose order by latent MSE and
  by decoded L1 disagree; and a rate–distortion figure: decoded L1 against measured bits with
  error bars over seeds, the continuous floors and the palette codecs of the same runs.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from analysis.decomposition import SCHEMES, FitSettings, run_latents, study
from analysis.runs import keep, kept, study_arguments
from vqlab import tables

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vqlab.quantizers import QuantizerConfig

# quantizer -> the scheme of ``analysis.decomposition`` it trains end to end
SCHEME_OF = {
    "vq": "flat",
    "vq_ema": "flat",
    "tree_vq": "tree",
    "fsq": "uniform_grid",
    "learned_grid": "scalar",
    "radix": "radix",
}
COMPOSITE_SCHEME = {"rvq": "residual", "product": "product"}  # the k-means schemes: over flat VQ parts only
CONTROL = "identity"
TABLE_COLUMNS = ("side", "scheme", "variant", "n", "bits", "measured bits", "l1", "mse", "quantization gap")
# the columns ``vqlab.report.FORMATS`` does not know (l1, measured bits and the gap are shown as the report shows them)
FORMATS = {"bits": ".2f", "mse": ".4g"}
SMOKE = {"train_count": 64, "learned_steps": 50}
DEFAULT_FIT = FitSettings()


def scheme_of(quantizer: QuantizerConfig) -> str | None:
    """The scheme a quantizer trains end to end; ``None`` for one that trains none of them (a
    residual or product quantizer over FSQ parts is a grid, not the k-means scheme of that name)."""
    if quantizer.name in COMPOSITE_SCHEME:
        base = getattr(quantizer, "base", None)
        return COMPOSITE_SCHEME[quantizer.name] if base is not None and SCHEME_OF.get(base.name) == "flat" else None
    return SCHEME_OF.get(quantizer.name)


@dataclass
class SweepRuns:
    """A sweep's finished runs, one row per seed (``vqlab.report.per_seed`` columns with ``scheme``
    and ``width``): the tokenizers that train a scheme, the continuous floors, and the trivial
    codecs the runs measured (``vqlab.report.baseline_rows``)."""

    cotrained: pd.DataFrame
    floors: pd.DataFrame
    codecs: list[dict]


def sweep_runs(experiment: str, tracking_uri: str) -> SweepRuns:
    """``experiment``'s runs from MLflow, each run's quantizer read from its run folder."""
    from vqlab import quantizers
    from vqlab.report import ReportError, baseline_rows, fetch_runs, per_seed, rows_of
    from vqlab.runfolder import RunFolder

    runs = fetch_runs(experiment, tracking_uri)
    seeds = per_seed(runs)
    schemes, widths = [], []
    for run_dir in seeds["run_dir"]:
        folder = RunFolder(Path(run_dir)) if isinstance(run_dir, str) else None
        quantizer = folder.read_config().quantizer if folder is not None and folder.has_config() else None
        if quantizer is None:
            scheme, width = None, math.nan
        else:
            scheme = CONTROL if quantizer.name == CONTROL else scheme_of(quantizer)
            width = quantizers.build(quantizer).dim
        schemes.append(scheme)
        widths.append(width)
    seeds = seeds.assign(scheme=schemes, width=widths)
    floors = seeds[seeds["scheme"] == CONTROL].reset_index(drop=True)
    cotrained = seeds[seeds["scheme"].notna() & (seeds["scheme"] != CONTROL)].reset_index(drop=True)
    if cotrained.empty or floors.empty:
        raise ReportError(
            f"{experiment!r} needs tokenizers that train a scheme ({', '.join(sorted(SCHEME_OF | COMPOSITE_SCHEME))}) "
            f"and {CONTROL} floors with run folders; it has {', '.join(dict.fromkeys(seeds['name']))}"
        )
    return SweepRuns(cotrained, floors, baseline_rows(rows_of(runs)))


def posthoc_rows(
    floors: pd.DataFrame,
    bits: list[int],
    schemes: tuple[str, ...] = SCHEMES,
    train_count: int = 8192,
    fit: FitSettings = DEFAULT_FIT,
    device: str = "cpu",
    progress: bool = True,
    fits: Path | None = None,
) -> pd.DataFrame:
    """Per floor run (one seed of the continuous model), every scheme at every budget fitted on its
    training latents and read on its validation latents (``analysis.decomposition.study``): the
    schemes' rows with ``seed``, ``variant`` (the floor's name), ``l1`` (decoded) and the floor's own
    L1, and ``quantization gap``: decoded L1 minus the floor's, the post-hoc scheme's cost. With
    ``fits``, each floor's rows are kept there (``<variant>-seed<k>.json``, with what made them) and
    read instead of fitted again while the floor run and the settings are the same: the fits are
    the study's cost (tens of minutes a floor), the co-trained rows are read from MLflow each time,
    so a sweep's study can be rerun as its tokenizers finish."""
    rows = []
    for floor in floors.itertuples():
        settings = {"run_dir": str(floor.run_dir), "floor_l1": float(floor.l1), "bits": [int(b) for b in bits]}
        settings |= {"schemes": list(schemes), "train_count": train_count, "fit": asdict(fit)}
        path = fits / f"{floor.name}-seed{floor.seed}.json" if fits is not None else None
        record = kept(path, settings) if path is not None else None
        found = record["rows"] if record is not None else None
        if found is None:
            found = []
            latents = run_latents(floor.run_dir, train_count, device)
            for row in study(latents.train, latents.held_out, bits, schemes, fit, latents.decoded_l1, progress):
                l1, measured = row.pop("decoded_l1", math.nan), row.pop("measured_bits", math.nan)
                found.append(
                    row
                    | {"side": "post-hoc", "variant": floor.name, "seed": int(floor.seed), "l1": l1}
                    | {"measured bits": measured, "quantization gap": l1 - floor.l1}
                )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                keep(path, settings, {"rows": found})
        rows += found
    return pd.DataFrame(rows)


def cotrained_rows(cotrained: pd.DataFrame) -> pd.DataFrame:
    """The co-trained tokenizers in the seed table's columns: bits are log2 K."""
    return pd.DataFrame(
        {
            "side": "co-trained",
            "scheme": cotrained["scheme"],
            "variant": cotrained["name"],
            "seed": cotrained["seed"],
            "bits": cotrained["bits/token"],
            "measured bits": cotrained["measured bits"],
            "l1": cotrained["l1"],
            "mse": math.nan,
            "quantization gap": cotrained["quantization gap"],
        }
    )


def budget(bits: float) -> int:
    """A row's budget in whole bits (FSQ 8-5-5-5's 9.97 bits is the 10-bit budget)."""
    return round(bits)


def summary(seeds: pd.DataFrame) -> pd.DataFrame:
    """One row per side, scheme and budget: ``n`` seeds, each value's mean and its 95% t interval
    (``<column>_ci``) over the seeds."""
    from vqlab.report import half_width

    rows = []
    values = ("measured bits", "l1", "mse", "quantization gap")
    keyed = seeds.assign(budget=seeds["bits"].map(budget))
    for (side, scheme, _, variant), group in keyed.groupby(["side", "scheme", "budget", "variant"], sort=False):
        row = {"side": side, "scheme": scheme, "variant": variant, "n": len(group), "bits": group["bits"].mean()}
        for column in values:
            present = group[column].dropna()
            row |= {column: present.mean() if len(present) else math.nan, f"{column}_ci": half_width(present)}
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons(seeds: pd.DataFrame) -> pd.DataFrame:
    """Differences in L1 paired by seed (``vqlab.report.compare``): per scheme and budget,
    co-trained minus post-hoc of the same scheme and minus post-hoc ``flat``; on each side, every
    other scheme minus ``flat`` of the same budget."""
    from vqlab.report import compare

    keyed = seeds.assign(budget=seeds["bits"].map(budget))
    rows = []

    def add(kind: str, what: str, ours: pd.DataFrame, theirs: pd.DataFrame, b: int) -> None:
        found = compare(ours, theirs, "l1")
        if found is not None:
            found.pop("used")
            rows.append({"comparison": kind, "what": what, "bits": b} | found)

    for (scheme, b), group in keyed.groupby(["scheme", "budget"], sort=False):
        trained, fitted = group[group["side"] == "co-trained"], group[group["side"] == "post-hoc"]
        for variant, runs in trained.groupby("variant", sort=False):
            add("co-trained − post-hoc", f"{variant} − post-hoc {scheme}", runs, fitted, b)
            if scheme != "flat":  # and against the best-fitting post-hoc scheme, flat k-means
                flat = keyed[(keyed["side"] == "post-hoc") & (keyed["scheme"] == "flat") & (keyed["budget"] == b)]
                add("co-trained − post-hoc", f"{variant} − post-hoc flat", runs, flat, b)
    for (side, b), group in keyed.groupby(["side", "budget"], sort=False):
        # a post-hoc row is its scheme (every scheme fits the one floor); a co-trained row its variant
        rows_of = group["scheme"] if side == "post-hoc" else group["variant"]
        flat = group[group["scheme"] == "flat"]
        if flat.empty or flat["seed"].duplicated().any():
            continue  # no flat row, or two flat tokenizers: no one reference
        for name, runs in group[group["scheme"] != "flat"].groupby(rows_of, sort=False):
            add(f"{side}: scheme − flat", f"{name} − flat", runs, flat, b)
    return pd.DataFrame(rows)


def disagreements(seeds: pd.DataFrame) -> list[str]:
    """Per budget, the pairs of post-hoc schemes that latent MSE and decoded L1 (means over seeds)
    put in opposite order, and Kendall's tau between the two orders: where fitting on the latent
    and reading on the image part ways."""
    from scipy import stats

    lines = []
    fitted = seeds[seeds["side"] == "post-hoc"].dropna(subset=["mse", "l1"])
    for b, group in fitted.groupby(fitted["bits"].map(budget)):
        means = group.groupby("scheme", sort=False)[["mse", "l1"]].mean()
        if len(means) < 2:
            continue
        tau = stats.kendalltau(means["mse"], means["l1"]).statistic
        names = list(means.index)
        flipped = [
            f"{a} < {b_} in MSE, > in L1"
            if means.loc[a, "mse"] < means.loc[b_, "mse"]
            else f"{b_} < {a} in MSE, > in L1"
            for i, a in enumerate(names)
            for b_ in names[i + 1 :]
            if (means.loc[a, "mse"] - means.loc[b_, "mse"]) * (means.loc[a, "l1"] - means.loc[b_, "l1"]) < 0
        ]
        lines.append(
            f"{b} bits: Kendall's tau between the post-hoc schemes' MSE and decoded-L1 orders {tau:+.2f}; "
            + (f"they disagree on {'; '.join(flipped)}" if flipped else "the two orders agree")
        )
    return lines


def markdown(table: pd.DataFrame) -> str:
    """``summary`` as markdown: ``mean ± half-width`` (no ``±`` at n = 1), ``—`` where missing."""
    from vqlab.report import estimate

    def shown(row: pd.Series, column: str) -> str:
        width = row.get(f"{column}_ci", math.nan)
        if column not in FORMATS:
            return estimate(column, row[column], width)
        if pd.isna(row[column]):
            return tables.MISSING
        text = tables.cell(row[column], FORMATS[column])
        return text if pd.isna(width) else f"{text} ± {tables.cell(width, FORMATS[column])}"

    cells = (
        [row["side"], row["scheme"], row["variant"], str(int(row["n"])), *(shown(row, c) for c in TABLE_COLUMNS[4:])]
        for _, row in table.iterrows()
    )
    return tables.markdown(TABLE_COLUMNS, cells)


def comparisons_markdown(table: pd.DataFrame) -> str:
    """``comparisons`` as markdown, with each difference's seeds and verdict."""
    from vqlab.report import estimate

    if table.empty:
        return ""
    cells = (
        [
            row["comparison"],
            row["what"],
            str(row["bits"]),
            estimate("l1", row["difference"], row["ci"], sign="+"),
            row["seeds"],
            row["verdict"],
        ]
        for _, row in table.iterrows()
    )
    return tables.markdown(("comparison", "what", "bits", "L1 difference", "seeds", "verdict"), cells)


def floors_markdown(floors: pd.DataFrame) -> str:
    """The continuous floors by width, mean ± interval over seeds."""
    from vqlab.report import estimate, half_width

    cells = []
    for (name, width), group in floors.groupby(["name", "width"], sort=True):
        text = estimate("l1", group["l1"].mean(), half_width(group["l1"]))
        cells.append([name, str(int(width)), str(len(group)), text])
    return tables.markdown(("floor", "width", "n", "l1"), cells)


def figure(table: pd.DataFrame, floors: pd.DataFrame, codecs: list[dict], title: str) -> Figure:
    """Decoded L1 against measured bits: post-hoc schemes hollow squares, co-trained filled circles,
    one colour per scheme, error bars the 95% t intervals over seeds; the continuous floors as
    dotted lines named by width at the right edge (the interval of the mean shaded); the palette
    codecs of the same runs as dashed curves, up to the rates the rows reach."""
    from matplotlib.figure import Figure

    from vqlab.report import half_width

    made = Figure(figsize=(9, 5), layout="constrained")
    ax = made.subplots()
    colours = {scheme: f"C{i}" for i, scheme in enumerate(dict.fromkeys(table["scheme"]))}
    shown = table.dropna(subset=["l1", "measured bits"])
    for _, row in shown.iterrows():
        trained = row["side"] == "co-trained"
        colour = colours[row["scheme"]]
        ax.errorbar(
            row["measured bits"],
            row["l1"],
            xerr=None if pd.isna(row["measured bits_ci"]) else row["measured bits_ci"],
            yerr=None if pd.isna(row["l1_ci"]) else row["l1_ci"],
            fmt="o" if trained else "s",
            markerfacecolor=colour if trained else "none",
            color=colour,
            capsize=3,
            label=f"{row['variant']} (co-trained)" if trained else f"{row['scheme']} (post-hoc)",
        )
    for width, group in floors.groupby("width", sort=True):
        mean, spread = group["l1"].mean(), half_width(group["l1"])
        ax.axhline(mean, linestyle=":", color="grey", linewidth=1)
        ax.annotate(f"d{int(width)}", (1, mean), xycoords=("axes fraction", "data"), fontsize="x-small", color="grey")
        if not pd.isna(spread):
            ax.axhspan(mean - spread, mean + spread, color="grey", alpha=0.08, linewidth=0)
    reach = shown["measured bits"].max() + 2 if len(shown) else math.inf
    palettes = pd.DataFrame([c for c in codecs if "bits/token" in c and c["bits/token"] <= reach])
    for method, points in palettes.groupby("method", sort=False) if len(palettes) else []:
        points = points.sort_values("bits/token")
        style = {"linestyle": "--", "marker": ".", "color": "black", "alpha": 0.6}
        ax.plot(points["bits/token"], points["l1"], label=f"{method}: log2 colours", **style)
    ax.plot([], [], linestyle=":", color="grey", label="continuous floors (width at right)")
    ax.set(xlabel="measured bits per token (Miller–Madow)", ylabel="validation L1 (decoded)", title=title)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.04, 1))
    return made


def analyse(
    experiment: str,
    out: Path,
    tracking_uri: str,
    width: int = 4,
    bits: list[int] | None = None,
    schemes: tuple[str, ...] = SCHEMES,
    train_count: int = 8192,
    fit: FitSettings = DEFAULT_FIT,
    device: str = "cpu",
    progress: bool = True,
    again: bool = False,
) -> tuple[dict[str, pd.DataFrame | list[str]], list[Path]]:
    """The study over ``experiment``: its tables (``seeds``, ``summary``, ``comparisons``,
    ``floors``) and ``disagreements``, and the files written to ``out/<experiment>``: ``seeds.csv``,
    ``table.csv``, ``table.md`` and ``rate_distortion.png``. ``bits`` default: the budgets of the
    co-trained tokenizers. Each floor's fits are kept in ``out/<experiment>/fits/`` and reused
    while the floor and the settings are the same (``again``: fitted anew)."""
    from vqlab.report import ReportError

    found = sweep_runs(experiment, tracking_uri)
    floors = found.floors[found.floors["width"] == width]
    if floors.empty:
        widths = sorted({int(w) for w in found.floors["width"]})
        raise ReportError(f"{experiment!r} has no {CONTROL} floor of width {width}; its floors' widths: {widths}")
    bits = bits or sorted({budget(b) for b in found.cotrained["bits/token"].dropna()})
    folder = out / experiment
    if again:
        shutil.rmtree(folder / "fits", ignore_errors=True)
    fitted = posthoc_rows(floors, bits, schemes, train_count, fit, device, progress, folder / "fits")
    seeds = pd.concat([fitted, cotrained_rows(found.cotrained)])
    seeds = seeds.reset_index(drop=True)
    table, paired = summary(seeds), comparisons(seeds)
    notes = disagreements(seeds)
    folder.mkdir(parents=True, exist_ok=True)
    seeds.to_csv(folder / "seeds.csv", index=False)
    table.to_csv(folder / "table.csv", index=False)
    text = [markdown(table), "", floors_markdown(found.floors), "", comparisons_markdown(paired), "", *notes]
    text.append(
        f"± is the 95% t interval over seeds; post-hoc schemes are fitted on {train_count} training crops' latents "
        f"of the width-{width} continuous model of each seed and decoded by it."
    )
    (folder / "table.md").write_text("\n".join(text) + "\n")
    title = f"{experiment}: post-hoc (hollow) against co-trained (filled)"
    figure(table, found.floors, found.codecs, title).savefig(folder / "rate_distortion.png", dpi=120)
    result = {"seeds": seeds, "summary": table, "comparisons": paired, "floors": found.floors, "disagreements": notes}
    return result, [folder / name for name in ("seeds.csv", "table.csv", "table.md", "rate_distortion.png")]


def log_to_mlflow(result: dict, params: dict, files: list[Path], root: Path, experiment: str, uri: str = "") -> str:
    """One run ``posthoc:<experiment>`` of the MLflow experiment ``decomposition``: per row
    ``l1/<side>/<scheme or variant>`` and its interval at step = the budget."""
    from analysis.runs import log_study

    metrics = []
    for row in result["summary"].itertuples():
        # MLflow names allow letters, digits and _-. :/ only: a grid point's name has commas
        key = re.sub(r"[^\w\-. :/]", "_", f"{row.side}/{row.scheme if row.side == 'post-hoc' else row.variant}")
        metrics.append({"step": budget(row.bits), f"l1/{key}": row.l1, f"l1_ci/{key}": row.l1_ci})
    metrics = [{k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))} for m in metrics]
    return log_study("decomposition", f"posthoc:{experiment}", params, metrics, files, root, uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.posthoc",
        description="Post-hoc quantizers of the continuous model against co-trained tokenizers, seed by seed.",
    )
    parser.add_argument(
        "experiment", help="a sweep's MLflow experiment with identity floors (e.g. decompositions-photos)"
    )
    parser.add_argument("--width", type=int, default=4, help="the continuous floor whose latents the schemes fit")
    parser.add_argument("--bits", nargs="+", type=int, help="budgets (default: the co-trained tokenizers')")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--train-count", type=int, default=8192, help="training crops whose latents are fitted")
    parser.add_argument("--min-points", type=int, default=8, help="training latents per centroid, at least")
    parser.add_argument("--learned-steps", type=int, default=DEFAULT_FIT.learned_steps)
    parser.add_argument(
        "--again", action="store_true", help="fit every floor anew, also one whose fits were kept with these settings"
    )
    study_arguments(parser, "posthoc")
    parser.add_argument("--smoke", action="store_true", help="few crops, a short radix_learned fit: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if min(args.width, args.train_count, args.min_points, args.learned_steps) < 1 or any(
        b < 2 for b in args.bits or []
    ):
        parser.error("--width, --train-count, --min-points, --learned-steps must be >= 1 and --bits >= 2")
    from vqlab.errors import UserError
    from vqlab.report import store

    uri = store(args.tracking_uri, args.root)
    out = args.out or args.root / "posthoc"
    fit = FitSettings(args.min_points, args.learned_steps)
    try:
        result, files = analyse(
            args.experiment,
            out,
            uri,
            args.width,
            args.bits,
            tuple(args.schemes),
            args.train_count,
            fit,
            args.device,
            again=args.again,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(files[2].read_text())
    if not args.no_mlflow:
        params = {"experiment": args.experiment, "width": args.width, "train_count": args.train_count}
        run_id = log_to_mlflow(result, params, files, args.root, args.experiment, uri)
        print(f"MLflow run {run_id} (experiment decomposition)")
    print(f"wrote {', '.join(str(p) for p in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
