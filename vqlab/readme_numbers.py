"""``python -m vqlab.readme_numbers``: rerun the README's single-run numbers and rewrite them in place.

A number in the README is a claim that the current code makes it. The README marks each number
this command owns with a pair of HTML comments, and the command rewrites what lies between them:

    <!-- numbers:default -->...<!-- /numbers:default -->  the final numbers of one run of a preset
                                                           (``default``; trained here, now)
    <!-- numbers:demo -->...<!-- /numbers:demo -->        the demo's table, rendered from the MLflow
                                                           store by ``vqlab.report`` (``make demo`` first),
                                                           and its figures in ``docs/figures/``

Each block says which command made it, at which commit and thread count. ``--blocks`` picks the
blocks; ``--config`` the preset of the ``default`` block (the tests use ``smoke``). Text outside
the markers is never touched, and a README without a block's markers is an error naming them.

    python -m vqlab.readme_numbers                    # both blocks, README.md
    python -m vqlab.readme_numbers --blocks default   # only the default run (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from vqlab import config, report
from vqlab.checkpoint import write_text_atomic
from vqlab.errors import UserError
from vqlab.runfolder import RunFolder
from vqlab.runtime import git_commit
from vqlab.tracking import TRIVIAL_CODECS

BLOCKS = ("default", "demo")
FIGURES = Path("docs") / "figures"  # beside the README: the demo's figures it shows


def markers(block: str) -> tuple[str, str]:
    return f"<!-- numbers:{block} -->", f"<!-- /numbers:{block} -->"


def replace_block(text: str, block: str, content: str) -> str:
    """``text`` with what lies between ``block``'s markers replaced by ``content``."""
    start, end = markers(block)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise UserError(f"the README has no {start} ... {end} block to rewrite")
    return pattern.sub(lambda _: f"{start}{content}{end}", text, count=1)


def provenance(command: str) -> str:
    commit = git_commit()
    return f"`{command}` at commit {commit[:10]}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def default_numbers(preset: str, root: Path) -> str:
    """One run of ``preset`` trained now; its final validation beside the palette codecs."""
    from vqlab.trainer import fit

    cfg = config.load(preset, {"tracking.root": str(root), "tracking.run_name": "readme", "tracking.mlflow": False})
    start = time.perf_counter()
    result = fit(cfg, restart=RunFolder.of(cfg).has_config())
    minutes = (time.perf_counter() - start) / 60
    run = RunFolder(result.run_dir)
    first = next(row for row in run.read_metrics() if "val/l1" in row)
    val, codecs = result.metrics, result.baseline
    palettes = "; ".join(
        f"{label}: L1 {codecs[f'{prefix}/l1']:.4f}, MSE {codecs[f'{prefix}/mse']:.4f}, "
        f"PSNR {codecs[f'{prefix}/psnr']:.1f} dB"
        for prefix, label in TRIVIAL_CODECS.items()
        if f"{prefix}/colors" in codecs
    )
    return (
        f"takes {minutes:.1f} minutes here and "
        f"ends at val L1 {val['val/l1']:.4f}, MSE {val['val/mse']:.4f}, PSNR {val['val/psnr']:.1f} dB, "
        f"codebook usage {val['val/codebook_usage']:.3f} (from L1 {first['val/l1']:.3f} at step 0; {palettes}; "
        f"{provenance(f'python -m vqlab.train --config {preset}')})"
    )


def demo_numbers(experiment: str, root: Path, tracking_uri: str | None, figures: Path) -> str:
    """The demo's comparison table as ``vqlab.report`` renders it, from the store; the README's
    figures of the same report are saved into ``figures``, so table and pictures show one demo."""
    rendered = report.render(experiment, tracking_uri, None, root / experiment / "report", root, None)
    report.readme_figures(rendered, figures)
    return f"\n{rendered.markdown}\n\n_{provenance(f'python -m vqlab.report {experiment}')}._\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqlab.readme_numbers", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--blocks", default=",".join(BLOCKS), help=f"comma-separated, of {', '.join(BLOCKS)}")
    parser.add_argument("--config", default="default", help="the preset of the default block's run")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="runs root (the demo's MLflow store)")
    parser.add_argument("--experiment", default="demo-photos", help="the demo block's MLflow experiment")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else <root>/mlflow.db)")
    args = parser.parse_args(argv)
    blocks = [name for name in args.blocks.split(",") if name]
    try:
        unknown = sorted(set(blocks) - set(BLOCKS))
        if unknown or not blocks:
            raise UserError(f"--blocks {args.blocks!r}: choose from {', '.join(BLOCKS)}")
        if not args.readme.is_file():
            raise UserError(f"no README at {args.readme}")
        for block in blocks:  # every marker is checked before anything runs
            replace_block(args.readme.read_text(), block, "")
        contents = {
            block: default_numbers(args.config, args.root / "readme")
            if block == "default"
            else demo_numbers(args.experiment, args.root, args.tracking_uri, args.readme.parent / FIGURES)
            for block in blocks
        }
        # Read again now: the default run takes minutes, and edits made to the README meanwhile stay.
        text = args.readme.read_text()
        for block, content in contents.items():
            text = replace_block(text, block, content)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_text_atomic(text, args.readme)
    print(f"rewrote {', '.join(blocks)} in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
