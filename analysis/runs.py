"""Read finished run folders into one table: the config that ran and its last metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vqlab.schema import flatten


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The latest value of every metric in ``metrics.jsonl``."""
    latest: dict[str, float] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            latest.update({k: v for k, v in row.items() if k != "step"})
    return latest


def collect(root: str | Path = "runs", experiment: str | None = None) -> list[dict[str, Any]]:
    """One row per run folder under ``root`` (or ``root/experiment``): ``run``, ``experiment``,
    every flattened config key and every last metric."""
    base = Path(root)
    pattern = f"{experiment}/*/config.yaml" if experiment else "*/*/config.yaml"
    rows = []
    for config in sorted(base.glob(pattern)):
        run_dir = config.parent
        row = {"experiment": run_dir.parent.name, "run": run_dir.name}
        row |= flatten(yaml.safe_load(config.read_text()) or {})
        row |= last_metrics(run_dir)
        rows.append(row)
    return rows


def table(root: str | Path = "runs", experiment: str | None = None):
    """``collect`` as a pandas DataFrame (pandas comes with mlflow and seaborn)."""
    import pandas as pd

    return pd.DataFrame(collect(root, experiment))
