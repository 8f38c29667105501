"""One run's folder: the only place that spells out the names of the files in it.

``<tracking.root>/<experiment>/<run>/``, or ``<tracking.root>/<experiment>/<run_group>/<run>/``
for a run in a group (a sweep's variant whose runs are its seeds: ``<variant>/seed<k>``)
(docs/architecture.md, "Run folder"), holds

    config.yaml                 the single record of what ran (rerun with ``--config`` on it)
    metrics.jsonl               every logged metric, one JSON object per line with its ``step``
    checkpoints/                ``step_*.pt`` and the ``last`` pointer (``vqlab.checkpoint``)
    figures/                    figures shown to people
    <prefix>codebook_histogram.npz   code histograms of the final validation (``ema_`` for the model EMA)
    <prefix>per_image_l1.npy    the final validation's L1 of each image, in dataset order (float64)
    reconstructions.npz         the shown validation crops, the final model's and the trivial codecs'
                                reconstructions of them (``vqlab.showcase.Showcase``)
    eval.json                   ``python -m vqlab.evaluate``'s results
    eval_train.json             the same on training crops (``--split train``)
    run.ipynb                   the executed notebook, when a notebook ran the run
    mlflow_run_id               the run's MLflow run id
    runtime.json                what the numbers depend on beyond the config (threads, CPU, torch, device)
    finished                    the end phase is done (its step); absent while there is work left

A driver (a notebook, a sweep) may make the folder before training starts, so that it knows where
everything will land; training then uses it as long as it holds no ``config.yaml`` of another run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vqlab.config import RunConfig, from_yaml, to_yaml

# The name of a run's config: its folder's, and the file a driver hands ``torchrun`` (``vqlab.notebook``).
CONFIG_FILE = "config.yaml"
# The shown crops' reconstructions: the file in the folder and the run's MLflow artifact (``vqlab.report``).
RECONSTRUCTIONS_FILE = "reconstructions.npz"


def group_folder(cfg: RunConfig) -> Path:
    """``<root>/<experiment>``, or ``<root>/<experiment>/<run_group>`` for a run in a group."""
    return Path(cfg.tracking.root) / cfg.tracking.experiment / cfg.tracking.run_group


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, cfg: RunConfig) -> RunFolder:
        """The folder ``cfg`` names: ``<root>/<experiment>/[<run_group>/]<run_name>``."""
        if not cfg.tracking.run_name:
            raise ValueError("tracking.run_name is empty: a run without a name gets a new folder when it starts")
        return cls(group_folder(cfg) / cfg.tracking.run_name)

    @classmethod
    def new(cls, cfg: RunConfig) -> RunFolder:
        """A new folder ``<timestamp>-<quantizer>`` (with a suffix if that exists) for an unnamed run."""
        base = group_folder(cfg)
        name = f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.quantizer.name}"
        for suffix in range(1000):
            path = base / (name if suffix == 0 else f"{name}-{suffix}")
            try:
                path.mkdir(parents=True, exist_ok=False)
                return cls(path)
            except FileExistsError:
                continue
        raise FileExistsError(f"too many runs named {name} under {base}")

    @classmethod
    def of_checkpoint(cls, path: Path) -> RunFolder:
        """The run a checkpoint file ``<run>/checkpoints/step_*.pt`` belongs to."""
        return cls(Path(path).parent.parent)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def root(self) -> Path:
        """The ``tracking.root`` this run lives under (``<root>/<experiment>/[<run_group>/]<run>``:
        one level further up for a run in a group, as its config says)."""
        grouped = self.has_config() and bool(self.read_config().tracking.run_group)
        return self.path.resolve().parents[2 if grouped else 1]

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.json"

    @property
    def train_eval_file(self) -> Path:
        return self.path / "eval_train.json"

    @property
    def notebook(self) -> Path:
        return self.path / "run.ipynb"

    @property
    def mlflow_id_file(self) -> Path:
        return self.path / "mlflow_run_id"

    @property
    def runtime_file(self) -> Path:
        return self.path / "runtime.json"

    @property
    def finished_file(self) -> Path:
        return self.path / "finished"

    def histogram(self, prefix: str = "") -> Path:
        """The code histogram of a validation pass: ``""`` for the model, ``"ema_"`` for its EMA."""
        return self.path / f"{prefix}codebook_histogram.npz"

    def per_image_l1(self, prefix: str = "") -> Path:
        """The L1 of each validation image of a validation pass (``ReconstructionMetrics.save``),
        ``""`` for the model, ``"ema_"`` for its EMA; also the run's MLflow artifact of that name."""
        return self.path / self.per_image_l1_name(prefix)

    @staticmethod
    def per_image_l1_name(prefix: str = "") -> str:
        """The file name of ``per_image_l1``: the name of the MLflow artifact, which has no folder."""
        return f"{prefix}per_image_l1.npy"

    @property
    def reconstructions(self) -> Path:
        """The shown validation crops and their reconstructions at the end phase (``vqlab.showcase``)."""
        return self.path / RECONSTRUCTIONS_FILE

    def figure(self, name: str) -> Path:
        return self.figures / name

    # --- contents ------------------------------------------------------------------------------
    def has_config(self) -> bool:
        return self.config_file.is_file()

    def read_config(self) -> RunConfig:
        return from_yaml(self.config_file.read_text(), str(self.config_file))

    def write_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(to_yaml(cfg))

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of ``metrics.jsonl`` (``[]`` before the first log). Each row ends with a newline;
        what follows the last one is a row still being written (a sweep reads a running run's file)."""
        if not self.metrics_file.is_file():
            return []
        complete = self.metrics_file.read_text().split("\n")[:-1]
        return [json.loads(line) for line in complete if line]

    def last_metrics(self, prefix: str | tuple[str, ...] = "") -> dict[str, float]:
        """The latest value of every metric (whose name starts with ``prefix``, or one of them)."""
        latest: dict[str, float] = {}
        for row in self.read_metrics():
            latest |= {k: v for k, v in row.items() if k != "step" and k.startswith(prefix)}
        return latest

    def is_finished(self) -> bool:
        """The run's end phase (final validation, histograms, figures, MLflow end) is done."""
        return self.finished_file.is_file()

    def mark_finished(self, step: int) -> None:
        self.finished_file.write_text(f"{step}\n")

    def clear_finished(self) -> None:
        self.finished_file.unlink(missing_ok=True)

    def write_runtime(self, record: dict[str, str]) -> None:
        self.runtime_file.write_text(json.dumps(record, indent=2) + "\n")

    def mlflow_run_id(self) -> str | None:
        return self.mlflow_id_file.read_text().strip() or None if self.mlflow_id_file.is_file() else None

    def set_mlflow_run_id(self, run_id: str) -> None:
        self.mlflow_id_file.write_text(run_id + "\n")
