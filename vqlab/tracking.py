"""One logging call for every sink: the terminal (tqdm), ``metrics.jsonl`` and MLflow.

Only the main process (rank 0) constructs a ``RunLogger`` with ``active=True``; the other ranks
get an inactive one, so no caller branches on the rank.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vqlab.config import TrackingConfig


def mlflow_uri(cfg: TrackingConfig) -> str:
    """Explicit config, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``."""
    if cfg.mlflow_uri:
        return cfg.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.root).resolve() / 'mlflow.db'}"


class RunLogger:
    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        total_steps: int,
        params: dict[str, Any],
        active: bool = True,
        resume_step: int = 0,
    ):
        """``resume_step > 0`` continues a run: metrics logged after that step by the interrupted
        process are dropped, and the same MLflow run is continued."""
        self.active = active
        self.run_dir = run_dir
        self.mlflow = None
        self.bar = tqdm(total=total_steps, disable=not (active and cfg.progress), dynamic_ncols=True, desc=run_dir.name)
        if not active:
            return
        path = run_dir / "metrics.jsonl"
        if resume_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(f"{line}\n" for line in kept))
        self.jsonl = path.open("a")
        if cfg.mlflow:
            self.mlflow = start_mlflow_run(cfg, run_dir, params, continue_run=resume_step > 0)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, metrics: dict[str, float], step: int, show: bool = False) -> None:
        """Write ``metrics`` at ``step`` everywhere; ``show`` also prints them as a line."""
        if not self.active:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
        if show:
            self.bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        else:
            self.bar.set_postfix({k.split("/", 1)[-1]: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.active and self.mlflow is not None:
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def close(self, status: str = "FINISHED") -> None:
        self.bar.close()
        if not self.active:
            return
        self.jsonl.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)


def start_mlflow_run(cfg: TrackingConfig, run_dir: Path, params: dict[str, Any], continue_run: bool = False):
    """Open (or continue) the MLflow run of ``run_dir``; artifacts go to ``<root>/mlartifacts``."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri(cfg))
    id_file = run_dir / "mlflow_run_id"
    if continue_run and id_file.is_file():
        mlflow.start_run(run_id=id_file.read_text().strip())
        return mlflow
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        location = (Path(cfg.root).resolve() / "mlartifacts").as_uri()
        experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_dir.name, tags={"vqlab.run_dir": str(run_dir.resolve())}
    )
    id_file.write_text(run.info.run_id + "\n")
    mlflow.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in params.items()})
    return mlflow
