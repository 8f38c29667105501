"""Every quantizer under the same budget: ``python -m analysis.zoo --steps 300``.

Trains each quantizer's preset section (``vqlab/configs/<name>.yaml``, ~1k codes) inside one base
preset (model, data, optimizer from ``--base``, default ``default``) for the same number of steps,
then prints a markdown table of the final validation metrics and writes it as JSON. Rerunnable:
the table is read back from the run folders (``analysis.runs``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import vqlab
from analysis.runs import collect
from vqlab import tables
from vqlab.config import read_source
from vqlab.runfolder import RunFolder

COLUMNS = ("val/l1", "val/psnr", "val/codebook_usage", "val/perplexity")


def run_all(names: list[str], base: str, steps: int, root: Path, experiment: str) -> None:
    for name in names:
        raw = read_source(base)
        raw["quantizer"] = read_source(name)["quantizer"]
        overrides = {
            "train.steps": steps,
            "optim.warmup_steps": min(steps // 10, 50),
            "eval.every": 0,
            "tracking.root": str(root),
            "tracking.experiment": experiment,
            "tracking.run_name": name,
            "tracking.mlflow": False,
        }
        vqlab.fit(vqlab.config.load(raw, overrides))


def table(root: Path, experiment: str) -> list[dict]:
    rows = []
    for run in collect(root, experiment):
        size = vqlab.quantizers.build(RunFolder(root / experiment / run["run"]).read_config().quantizer)
        row = {"quantizer": run["run"], "codes": size.codebook_size if size.discrete else None}
        row |= {column: run.get(column, math.nan) for column in COLUMNS}
        row["steps"] = run["train.steps"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """PSNR to 2 decimals, the other metrics to 4; ``-`` where missing (a continuous quantizer has no codes)."""
    header = ["quantizer", "codes", "val L1", "val PSNR", "usage", "perplexity"]
    cells = (
        [r["quantizer"], tables.cell(r["codes"], missing="-")]
        + [tables.cell(r[c], ".2f" if c == "val/psnr" else ".4f", missing="-") for c in COLUMNS]
        for r in rows
    )
    return tables.markdown(header, cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--base", default="default", help="preset giving everything but the quantizer")
    parser.add_argument("--quantizers", nargs="*", default=None, help="default: every registered quantizer")
    parser.add_argument("--root", type=Path, default=Path("runs"))
    parser.add_argument("--experiment", default="zoo")
    args = parser.parse_args(argv)
    names = args.quantizers or vqlab.quantizers.available()
    run_all(names, args.base, args.steps, args.root, args.experiment)
    rows = table(args.root, args.experiment)
    print(markdown(rows))
    out = args.root / args.experiment / "zoo.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
