"""Read finished run folders into one table: the config that ran and its last metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vqlab.runfolder import RunFolder
from vqlab.schema import flatten, to_dict


def run_folders(root: str | Path = "runs", experiment: str | None = None) -> list[RunFolder]:
    """Every run folder (one holding a config) under ``root/<experiment>/``, sorted by path."""
    experiments = [Path(root) / experiment] if experiment else sorted(p for p in Path(root).iterdir() if p.is_dir())
    folders = (RunFolder(p) for base in experiments if base.is_dir() for p in sorted(base.iterdir()) if p.is_dir())
    return [run for run in folders if run.has_config()]


def collect(root: str | Path = "runs", experiment: str | None = None) -> list[dict[str, Any]]:
    """One row per run folder under ``root`` (or ``root/experiment``): ``run``, ``experiment``,
    every flattened config key and every last metric."""
    rows = []
    for run in run_folders(root, experiment):
        row = {"experiment": run.path.parent.name, "run": run.name}
        row |= flatten(to_dict(run.read_config()))
        row |= run.last_metrics()
        rows.append(row)
    return rows


def table(root: str | Path = "runs", experiment: str | None = None):
    """``collect`` as a pandas DataFrame (pandas comes with mlflow and seaborn)."""
    import pandas as pd

    return pd.DataFrame(collect(root, experiment))
