"""``python -m vqlab.evaluate --run runs/<exp>/<run>``: evaluate a run's checkpoint.

    python -m vqlab.evaluate --run runs/demo/<run> [--checkpoint FILE] [--metrics fid,lpips] [key=value ...]
    torchrun --nproc-per-node 8 -m vqlab.evaluate --run-dir runs/demo/<run>   # --run clashes with torchrun's --run-path

The run's ``config.yaml`` rebuilds the model; the checkpoint is the newest valid one (or
``--checkpoint``); the data is the run's validation split unless ``data.*`` overrides name
another. ``--split train`` measures the first ``data.val_count`` crops of the training split
instead (content the model trained on: with ``codebook`` it tells a dead code from one the held-out
images do not need), as ``eval_train/<name>`` in ``<run>/eval_train.json``. The evaluators, and
the function that runs them, are the ones training-time validation uses, so the numbers mean the
same. Under ``torchrun`` every rank takes a shard and the metrics
are computed over all of them. Rank 0 writes ``<run>/eval.json`` (metrics as ``eval/<name>``,
``eval_ema/<name>`` for the model EMA when the checkpoint has one, and the metrics skipped for
missing weights with the reason), the code histogram beside it (``eval_codebook_histogram.npz``,
and ``eval_ema_codebook_histogram.npz`` for the EMA), and logs them to the run's MLflow run when
``tracking.mlflow`` is on.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Subset

from vqlab import checkpoint, data, distributed, evaluators, quantizers
from vqlab.config import RunConfig, load, parse_overrides
from vqlab.errors import MissingFileError, UserError
from vqlab.evaluators import measure_with_ema
from vqlab.models import VQAutoencoder, build_autoencoder
from vqlab.runfolder import RunFolder
from vqlab.schema import ConfigError, to_dict
from vqlab.state import SavedWeights
from vqlab.tracking import log_evaluation

SPLITS = {"val": "eval", "train": "eval_train"}  # split -> metric prefix and file stem

# What may change between training and evaluation; the model must stay the one that was trained.
OVERRIDABLE = ("data.", "eval.", "train.device", "train.dtype", "tracking.")


@dataclass
class EvalResult:
    path: Path  # eval.json
    metrics: dict[str, float]
    missing: dict[str, str]  # metric -> why it was not computed
    step: int


def run_config(run_dir: Path, overrides: list[str], metrics: list[str] | None) -> RunConfig:
    """The run's config with evaluation-side overrides; MLflow resolves to the run's own store."""
    pairs = {"tracking.root": str(RunFolder(run_dir).root)}
    for key, value in parse_overrides(overrides).items():
        if not key.startswith(OVERRIDABLE):
            raise ConfigError(key, f"cannot change {key} when evaluating; only {', '.join(OVERRIDABLE)}")
        pairs[key] = value
    if metrics:
        pairs["eval.metrics"] = list(metrics)
    return load(to_dict(RunFolder(run_dir).read_config()), pairs)


def trained_model(
    run: RunFolder, cfg: RunConfig, device, checkpoint_path: Path | None = None
) -> tuple[VQAutoencoder, SavedWeights]:
    """The run's model with the weights of ``checkpoint_path`` (default: its newest valid
    checkpoint), and what that checkpoint holds (its path, step and the EMA's weights)."""
    if checkpoint_path is None:
        found = checkpoint.latest_valid(run.checkpoints, device)
        if found is None:
            raise MissingFileError(f"no readable checkpoint in {run.checkpoints}")
        saved = SavedWeights.of(*found)
    else:
        saved = SavedWeights.read(checkpoint_path, device)
    model = build_autoencoder(cfg.model, quantizers.build(cfg.quantizer)).to(device)
    return saved.load_into(model), saved


def split_dataset(cfg: RunConfig, split: str, count: int | None = None):
    """The run's ``val`` crops, or its first ``data.val_count`` ``train`` crops (what ``--split
    train`` measures); ``count`` takes that many instead."""
    splits = data.build_datasets(cfg.data, cfg.train.seed)
    dataset = splits.val if split == "val" else splits.train
    if count is None and split == "train":
        count = cfg.data.val_count
    return dataset if count is None else Subset(dataset, range(min(count, len(dataset))))


def evaluate_run(
    run_dir: Path,
    checkpoint_path: Path | None = None,
    metrics: list[str] | None = None,
    overrides: list[str] | None = None,
    out: Path | None = None,
    split: str = "val",
) -> EvalResult:
    """Evaluate one checkpoint of ``run_dir`` on its ``val`` or ``train`` split; see the module docstring."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    run = RunFolder(run_dir)
    run_dir = run.path
    if not run.has_config():
        raise MissingFileError(f"no run folder ({run.config_file.name}) at {run_dir}")
    cfg = run_config(run_dir, list(overrides or []), metrics)
    prefix = SPLITS[split]
    out = Path(out) if out else (run.eval_file if split == "val" else run.train_eval_file)
    ctx = distributed.setup(cfg.train.device)
    try:
        model, saved = trained_model(run, cfg, ctx.device, checkpoint_path)
        averaged = saved.load_into(copy.deepcopy(model), ema=True) if saved.ema is not None else None
        loader = data.val_loader(split_dataset(cfg, split), cfg.data, ctx.rank, ctx.world_size)
        suite = evaluators.build(cfg.eval.metrics, model.quantizer.radices, ctx.device, cfg.eval)
        results, artifacts = measure_with_ema(
            model, averaged, loader, suite, ctx.device, cfg.train.dtype, prefix, out.parent, f"{out.stem}_"
        )
        result = EvalResult(path=out, metrics=results, missing=suite.missing, step=saved.step)
        if ctx.main:
            record = {
                "run_dir": str(run_dir.resolve()),
                "checkpoint": str(saved.path.resolve()),
                "step": result.step,
                "world_size": ctx.world_size,
                "data": to_dict(cfg.data),
                "metrics": results,
                "missing": suite.missing,
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2) + "\n")
            if cfg.tracking.mlflow and not log_evaluation(
                cfg.tracking, run, results, result.step, suite.missing, [out, *artifacts]
            ):
                print(f"no MLflow run recorded for {run_dir}; {out.name} only", file=sys.stderr)
        return result
    finally:
        distributed.teardown()


def summary(result: EvalResult) -> list[str]:
    values = "  ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    missing = [f"missing {name}: {why}" for name, why in result.missing.items()]
    return [f"eval step {result.step}: {values}", *missing, f"wrote {result.path}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vqlab.evaluate",
        description="Evaluate a run's checkpoint with vqlab's evaluators; writes <run>/eval.json.",
    )
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        type=Path,
        help="the run folder, runs/<experiment>/<run> (under torchrun write --run-dir: torchrun's own parser "
        "takes --run for its --run-path)",
    )
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint file (default: the run's newest valid one)")
    parser.add_argument(
        "--metrics",
        type=lambda text: [name for name in text.split(",") if name],
        metavar="NAME[,NAME...]",
        help=f"evaluators (default: the run's eval.metrics); available: {', '.join(evaluators.registry.names())}",
    )
    parser.add_argument(
        "--split",
        choices=tuple(SPLITS),
        default="val",
        help="val (default), or train: the first data.val_count training crops (eval_train/* in eval_train.json)",
    )
    parser.add_argument(
        "--out", type=Path, help="where to write the results (default: <run>/eval.json, eval_train.json for train)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="data.*, eval.*, train.device, train.dtype or tracking.* overrides, e.g. another dataset: "
        "data.name=imagefolder data.val_root=/data/val",
    )
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(args.run, args.checkpoint, args.metrics, args.overrides, args.out, args.split)
    except UserError as err:  # bad input is one line; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:  # the process group is gone by now, the environment is not
        print("\n".join(summary(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
