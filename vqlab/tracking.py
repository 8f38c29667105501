"""One logging call for every sink: the terminal (tqdm), ``metrics.jsonl`` and MLflow.

Only the main process (rank 0) constructs a ``RunLogger`` with ``active=True``; the other ranks
get an inactive one, so no caller branches on the rank.

MLflow is addressed through ``MlflowClient`` and explicit run ids, never the process-global active
run, so a run can be nested under a sweep's parent run (``tracking.parent_run_id``) from a script,
a notebook kernel or a torchrun worker alike. Every MLflow run vqlab makes, training's, a
sweep's or a study's, is made by ``create_run``, and every client by ``client``.
``metrics.jsonl`` is the record; the MLflow run mirrors it. A resumed run drops what the
interrupted process logged after its checkpoint from ``metrics.jsonl``; MLflow cannot delete
single metric values, so the run's previous MLflow run is deleted and a new one replays the kept
rows (the new id is written to the run folder).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vqlab.config import TrackingConfig
from vqlab.mlflow_store import open_client
from vqlab.runfolder import RunFolder

# What a person watches while training; everything else goes to the files and MLflow only.
PROGRESS_KEYS = {"train/loss": "loss", "train/lr": "lr", "train/images_per_s": "img/s"}
# The metrics a validation line and the final table show, in this order; per-digit detail is in the files.
HEADLINE = ("l1", "mse", "psnr", "ssim", "lpips", "fid", "codebook_usage", "perplexity")
# The trivial codecs' metric prefixes (``vqlab/evaluators/baselines.py``) and the one name every
# table, figure, notebook and report gives each, so that a row reads the same wherever it shows.
TRIVIAL_CODECS = {
    "baseline": "block mean colour",
    "baseline_palette": "palette (same code budget)",
    "baseline_kmeans": "palette, k-means (same code budget)",
}
# The experiment tag by which MLflow's UI tells a model-training experiment from a GenAI one (its
# JavaScript reads and sets it; MLflow's Python names no constant for it). Every vqlab experiment
# trains models: the UI's "Machine learning" kind. MLflow 3.17.2's UI itself follows its own
# GenAI / Model training switch (`?workflowType=machine_learning`, README), not this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
BATCH = 1000  # MLflow accepts at most 1000 metrics and 100 params per log_batch call
PARAM_BATCH = 100


def mlflow_uri(cfg: TrackingConfig) -> str:
    """Explicit config, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``."""
    if cfg.mlflow_uri:
        return cfg.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.root).resolve() / 'mlflow.db'}"


def headline(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The headline metrics among ``<prefix>/<name>`` keys, without the prefix."""
    return {name: metrics[f"{prefix}/{name}"] for name in HEADLINE if f"{prefix}/{name}" in metrics}


def summary_table(rows: dict[str, dict[str, float]]) -> str:
    """An aligned text table: one row per label, one column per headline metric any row has."""
    columns = [name for name in HEADLINE if any(name in values for values in rows.values())]
    width = max(len(label) for label in rows)
    lines = [" " * width + "".join(f"{c:>16s}" for c in columns)]
    for label, values in rows.items():
        cells = "".join(f"{values[c]:16.4f}" if c in values else f"{'-':>16s}" for c in columns)
        lines.append(f"{label:<{width}s}{cells}")
    return "\n".join(lines)


class MlflowRun:
    """One MLflow run, by id."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def log(self, rows: Iterable[dict[str, Any]]) -> None:
        """``{"step": s, name: value, ...}`` rows; non-finite values are left out (MLflow rejects NaN in
        some stores), so a missing value stays missing."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, int(row["step"]))
            for row in rows
            for key, value in row.items()
            if key != "step" and math.isfinite(value)
        ]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        for i in range(0, len(values), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=values[i : i + PARAM_BATCH])

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, status: str, end_time: int | None = None) -> None:
        self.client.set_terminated(self.run_id, status=status, end_time=end_time)

    def copy_from(self, source, skip_params: str = "") -> None:
        """Give this run the params (but those starting with ``skip_params``, when given), every
        metric's whole history (values, steps and times) and the artifacts of ``source`` (an
        ``mlflow.entities.Run`` of the same store), as a sweep does with a run it reuses."""
        from mlflow.entities import Metric

        self.log_params(
            {k: v for k, v in source.data.params.items() if not (skip_params and k.startswith(skip_params))}
        )
        metrics = [
            Metric(m.key, m.value, m.timestamp, m.step)
            for key in source.data.metrics
            for m in self.client.get_metric_history(source.info.run_id, key)
        ]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])
        if self.client.list_artifacts(source.info.run_id):
            with tempfile.TemporaryDirectory() as scratch:
                self.client.log_artifacts(self.run_id, self.client.download_artifacts(source.info.run_id, "", scratch))


def search_all(mlflow_client, experiment_id: str, query: str = "", order_by: list[str] | None = None) -> list:
    """Every run of ``experiment_id`` matching ``query``, page after page (one call returns at most
    a page)."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], query, order_by=order_by, page_token=token)
        runs.extend(page)
        if not (token := page.token):
            return runs


def client(store: TrackingConfig | str, create: bool = True):
    """The ``MlflowClient`` of a tracking config's store (``mlflow_uri``) or of a store URI, opened
    by ``vqlab.mlflow_store.open_client``: a new store is made once even when processes start
    together; ``create=False`` (reading) makes none, and a missing local store is an error."""
    return open_client(mlflow_uri(store) if isinstance(store, TrackingConfig) else store, create)


def experiment_id(mlflow_client, cfg: TrackingConfig) -> str:
    """The experiment named ``cfg.experiment``, created with its artifacts under ``<root>/mlartifacts``,
    marked as a model-training experiment (``EXPERIMENT_KIND_TAG``): a new one when it is created, one
    made before (by an older vqlab, by hand, or marked otherwise by the UI) when a run is next made in
    it; one already marked is not written to. Two processes starting runs of a new experiment at once
    may both try to create it: the one whose creation fails finds the other's."""
    from mlflow.exceptions import MlflowException

    experiment = mlflow_client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        location = (Path(cfg.root).resolve() / "mlartifacts").as_uri()
        try:
            return mlflow_client.create_experiment(
                cfg.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
            )
        except MlflowException:
            experiment = mlflow_client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def create_run(
    cfg: TrackingConfig,
    name: str,
    tags: dict[str, str] | None = None,
    folder: RunFolder | None = None,
    parent_run_id: str = "",
    mlflow_client=None,
    start_time: int | None = None,
) -> MlflowRun:
    """A new MLflow run named ``name`` in the experiment ``cfg.experiment`` (made if need be,
    ``experiment_id``) of ``cfg``'s store, tagged ``tags``; nested under ``parent_run_id``
    (``mlflow.parentRunId``) when given; for a run ``folder``, tagged ``vqlab.run_dir`` with the
    folder's resolved path and recorded in the folder (``mlflow_run_id``). Every MLflow run vqlab
    makes is made here: a training run's (``start_run``), a sweep's parent and a variant's
    (``vqlab.sweep``), a study's (``analysis.runs.log_study``). ``mlflow_client``: one the caller
    already holds for the same store; ``start_time`` (ms): when the run began, if not now (a copy)."""
    mlflow_client = mlflow_client or client(cfg)
    tags = dict(tags or {})
    if folder is not None:
        tags["vqlab.run_dir"] = str(folder.path.resolve())
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    created = mlflow_client.create_run(
        experiment_id(mlflow_client, cfg), start_time=start_time, run_name=name, tags=tags
    )
    if folder is not None:
        folder.set_mlflow_run_id(created.info.run_id)
    return MlflowRun(mlflow_client, created.info.run_id)


def run_label(cfg: TrackingConfig, name: str) -> str:
    """A run's MLflow run name: its folder's ``name``, after its group's (``<variant>/seed<k>``)."""
    return f"{cfg.run_group}/{name}" if cfg.run_group else name


def start_run(cfg: TrackingConfig, run: RunFolder, params: dict[str, Any], history: list[dict[str, Any]]) -> MlflowRun:
    """A new MLflow run for ``run`` (named ``run_label``, tagged ``cfg.tags``, nested under
    ``cfg.parent_run_id``) holding ``params`` and the ``history`` rows already logged; a previous
    MLflow run of the same folder (an interrupted process's) is deleted."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(cfg)
    previous = run.mlflow_run_id()
    if previous is not None:
        # already deleted, or recorded in another store: nothing to replace
        with contextlib.suppress(MlflowException):
            mlflow_client.delete_run(previous)
    mlflow_run = create_run(cfg, run_label(cfg, run.name), cfg.tags, run, cfg.parent_run_id, mlflow_client)
    mlflow_run.log_params(params)
    mlflow_run.log(history)
    return mlflow_run


def existing_run(cfg: TrackingConfig, run: RunFolder) -> MlflowRun | None:
    """The MLflow run recorded in ``run``'s folder, or ``None`` if there is none."""
    run_id = run.mlflow_run_id()
    return MlflowRun(client(cfg), run_id) if run_id else None


def progress_postfix(row: dict[str, float]) -> dict[str, str]:
    """What a progress bar shows of a metrics row: ``PROGRESS_KEYS``' labels and values."""
    return {label: f"{row[key]:.4g}" for key, label in PROGRESS_KEYS.items() if key in row}


def final_line(name: str, latest: dict[str, float], total_steps: int, seconds: float) -> str:
    """``<run>: <step>/<steps> steps in <time>, loss ..., img/s ...``: a progress bar's last line, once."""
    shown = "".join(f", {label} {value}" for label, value in progress_postfix(latest).items())
    step = int(latest.get("step", 0))
    return f"{name}: {step}/{total_steps} steps in {tqdm.format_interval(seconds)}{shown}"


class RunLogger:
    def __init__(
        self,
        cfg: TrackingConfig,
        run: RunFolder,
        total_steps: int,
        params: dict[str, Any],
        active: bool = True,
        resume_step: int | None = None,
        resume_rows: int | None = None,
    ):
        """``resume_step``: ``None`` starts the run's records afresh; a step continues them from a
        checkpoint of that step, dropping what the interrupted process logged after it: the rows
        after the first ``resume_rows`` (what the checkpoint recorded), or, for a checkpoint that
        recorded no count, the rows of later steps."""
        self.active = active
        self.run = run
        self.mlflow: MlflowRun | None = None
        self.rows = 0  # rows in metrics.jsonl
        self.bar = tqdm(total=total_steps, disable=not (active and cfg.progress), dynamic_ncols=True, desc=run.name)
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self.latest: dict[str, float] = {}  # the newest row, for the final line of a run without a bar
        if not active:
            return
        history = []
        if resume_step is not None:
            history = run.read_metrics()
            history = (
                history[:resume_rows] if resume_rows is not None else [r for r in history if r["step"] <= resume_step]
            )
        run.metrics_file.write_text("".join(json.dumps(row) + "\n" for row in history))
        self.rows = len(history)
        self.jsonl = run.metrics_file.open("a")
        if cfg.mlflow:
            self.mlflow = start_run(cfg, run, params, history)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Write ``metrics`` at ``step`` to ``metrics.jsonl`` and MLflow; the progress bar shows
        what a person watches during training."""
        if not self.active:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        self.rows += 1
        if self.mlflow is not None:
            self.mlflow.log([row])
        self.latest |= row
        shown = progress_postfix(row)
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def record_runtime(self, record: dict[str, str]) -> None:
        """What the run's numbers depend on beyond its config, in the folder and as MLflow tags."""
        if not self.active:
            return
        self.run.write_runtime(record)
        if self.mlflow is not None:
            for key, value in record.items():
                self.mlflow.set_tag(f"vqlab.{key}", value)

    def print(self, text: str) -> None:
        """A line above the progress bar (on the main process only)."""
        if self.active:
            self.bar.write(text)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.active and self.mlflow is not None:
            self.mlflow.artifact(path, folder)

    def close(self, status: str = "FINISHED") -> None:
        self.bar.close()
        if not self.active:
            return
        if self.bar.disable and status == "FINISHED":
            # Without a bar (a notebook a sweep executes, where every refresh would be an output of
            # its own) the run still ends on the line a bar would have left.
            print(final_line(self.run.name, self.latest, self.total_steps, time.perf_counter() - self.started))
        self.jsonl.close()
        if self.mlflow is not None:
            self.mlflow.end(status)


def log_evaluation(
    cfg: TrackingConfig,
    run: RunFolder,
    metrics: dict[str, float],
    step: int,
    missing: dict[str, str],
    files: list[Path],
) -> bool:
    """Add an evaluation's metrics (at the checkpoint's step) and files to the MLflow run that
    trained ``run``; ``False`` when the folder records no MLflow run."""
    mlflow_run = existing_run(cfg, run)
    if mlflow_run is None:
        return False
    mlflow_run.log([{"step": step, **metrics}])
    if missing:
        mlflow_run.set_tag("vqlab.eval.missing", ", ".join(sorted(missing)))
    for path in files:
        mlflow_run.artifact(path, "eval")
    return True
