"""Read finished run folders into one table: the config that ran and its last metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vqlab import checkpoint
from vqlab.runfolder import RunFolder
from vqlab.schema import flatten, to_dict


def folders(path: Path) -> list[RunFolder]:
    """The folders in ``path``, sorted, but hidden ones (a sweep's half-made copy, ``vqlab.sweep.reuse``)."""
    return [RunFolder(p) for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def run_folders(root: str | Path = "runs", experiment: str | None = None) -> list[RunFolder]:
    """Every run folder (one holding a config) under ``root/<experiment>/``, sorted by path: the
    experiment's runs, and the seed runs of a seeded sweep's variant folders (``<variant>/seed<k>``)."""
    experiments = [Path(root) / experiment] if experiment else sorted(p for p in Path(root).iterdir() if p.is_dir())
    runs = []
    for base in (e for e in experiments if e.is_dir()):
        for child in folders(base):
            if child.has_config():
                runs.append(child)
            else:  # a run group: a seeded sweep's variant, its runs the seeds
                runs += [run for run in folders(child.path) if run.has_config()]
    return runs


def collect(root: str | Path = "runs", experiment: str | None = None) -> list[dict[str, Any]]:
    """One row per run folder under ``root`` (or ``root/experiment``): ``run``, ``experiment``,
    every flattened config key and every last metric."""
    rows = []
    for run in run_folders(root, experiment):
        cfg = run.read_config()
        row = {"experiment": cfg.tracking.experiment, "run": run.name}
        row |= flatten(to_dict(cfg))
        row |= run.last_metrics()
        rows.append(row)
    return rows


def table(root: str | Path = "runs", experiment: str | None = None):
    """``collect`` as a pandas DataFrame (pandas comes with mlflow and seaborn)."""
    import pandas as pd

    return pd.DataFrame(collect(root, experiment))


def label(run_dir: str | Path) -> str:
    """A run's name in the studies' tables and output folders: its MLflow run name, which for a
    seeded sweep's run is ``<variant>/seed<k>`` (the folder's own name, ``seed<k>``, is every
    variant's)."""
    from vqlab.tracking import run_label

    run = RunFolder(Path(run_dir))
    return run_label(run.read_config().tracking, run.name)


def trained(run_dir: str | Path, device: str = "cpu"):
    """``(config, model)`` of a run folder's newest valid checkpoint, in eval mode."""
    from vqlab.evaluate import trained_model

    run = RunFolder(Path(run_dir))
    cfg = run.read_config()
    return cfg, trained_model(run, cfg, device)[0].eval()


def crops(cfg, split: str, count: int | None = None, device: str = "cpu"):
    """``(N, C, H, W)`` images in [-1, 1] of a run's data: its validation crops (``split="val"``) or
    its first ``count`` training crops (``"train"``), as ``vqlab.evaluate --split`` reads them."""
    import torch

    from vqlab import data
    from vqlab.evaluate import split_dataset

    batches = [
        b[0] if isinstance(b, (list, tuple)) else b for b in data.val_loader(split_dataset(cfg, split, count), cfg.data)
    ]
    return torch.cat(batches).to(device)


def keep(path: Path, settings: dict, record: dict) -> None:
    """Write a study's ``record`` to ``path`` as JSON (atomically: a file there is whole), under
    the ``settings`` that made it, for a rerun's ``kept``. numpy values are written as numbers
    and lists."""
    text = json.dumps({"settings": settings, **record}, indent=1, default=lambda value: value.tolist())
    checkpoint.write_text_atomic(text + "\n", path)


def kept(path: Path, settings: dict) -> dict | None:
    """What ``keep`` wrote at ``path``, where it was made with these ``settings``; else ``None``:
    a study's long work (fits, priors) is done again only where something that made it changed."""
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    return found if found.get("settings") == settings else None


def study_arguments(parser, study: str) -> None:
    """The options every study's command shares: its MLflow store, device, runs root, output
    folder (default ``<root>/<study>``) and whether to log to MLflow."""
    import torch

    parser.add_argument("--tracking-uri", help="MLflow store: default $MLFLOW_TRACKING_URI, else <root>/mlflow.db")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="runs root: MLflow store and outputs")
    parser.add_argument("--out", type=Path, help=f"default: <root>/{study}")
    parser.add_argument("--no-mlflow", action="store_true")


def log_study(
    study: str, name: str, params: dict, rows: list[dict], files: list[Path], root: Path, uri: str = ""
) -> str:
    """One FINISHED run named ``name`` of the MLflow experiment ``study`` (tag ``study``) in the store
    ``uri`` (default: ``$MLFLOW_TRACKING_URI``, else ``<root>/mlflow.db``): ``params``, metric
    ``rows`` (``{"step": s, key: value}``) and ``files`` as artifacts; returns its id."""
    from vqlab.config import TrackingConfig
    from vqlab.tracking import create_run

    run = create_run(TrackingConfig(root=str(root), experiment=study, mlflow_uri=uri), name, {"study": study})
    run.log_params(params)
    run.log(rows)
    for path in files:
        run.artifact(path)
    run.end("FINISHED")
    return run.run_id
