"""What ``notebooks/run.ipynb`` does, as tested functions; the notebook only calls them.

The notebook's ``parameters`` cell holds primitives (``preset``, ``overrides``, ``experiment``,
``run_name``, ``parent_run_id``, ``nproc``, ``smoke``); ``build_config`` turns them into a
validated ``RunConfig``, ``train`` trains it through ``vqlab.fit`` (the function behind
``python -m vqlab.train``; ``torchrun`` for several processes), ``evaluate_checkpoint`` measures the final
checkpoint with ``vqlab.evaluate`` on the validation crops and on training crops, and
``vqlab.figures`` draws what the notebook shows.

``execute`` runs the notebook headless with papermill into a path (a run folder's ``run.ipynb``);
the sweep driver (``vqlab.sweep``) calls it once per variant and logs the executed notebook to
the variant's MLflow run.
Papermill starts the kernel named ``vqlab``, resolved from a kernel spec that ``execute`` writes
for the running interpreter (``kernel_dir``), so a fresh checkout needs no ``ipykernel install``
and a kernel of another environment installed under the same name is never picked by mistake.
``python -m ipykernel install --sys-prefix --name vqlab`` is what ``jupyter lab`` needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vqlab.config import RunConfig, load, parse_yaml, to_yaml
from vqlab.runfolder import CONFIG_FILE, RunFolder
from vqlab.schema import ConfigError
from vqlab.trainer import fit

KERNEL = "vqlab"
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "run.ipynb"

# ``smoke=True``: the same data and model for a few steps on few images, to check a notebook or a
# sweep end to end in seconds; explicit overrides still win.
SMOKE = {
    "train.steps": 4,
    "train.log_every": 2,
    "train.checkpoint_every": 0,
    "optim.warmup_steps": 0,
    "eval.every": 0,
    "eval.grid_images": 8,
    "data.train_count": 256,
    "data.val_count": 64,
    "data.batch_size": 16,
    "data.val_batch_size": 64,
    "tracking.progress": False,
}


# On training crops the question is which codes the model can reach, not how it generalises: the
# weighted metrics (FID, LPIPS) stay with the validation split.
TRAIN_SPLIT_METRICS = ["reconstruction", "codebook"]


class TrainingFailedError(RuntimeError):
    """A ``torchrun`` training process exited with an error (its own output says why)."""


def as_overrides(overrides: dict[str, Any] | str | None) -> dict[str, Any]:
    """Dotted overrides given as a dict or as the text of a YAML mapping (``"optim.lr: 3e-4"``)."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, str):
        overrides = parse_yaml(overrides, "overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("", f"overrides must be a mapping of dotted keys to values, got {type(overrides).__name__}")
    return dict(overrides)


def build_config(
    preset: str | dict[str, Any] = "default",
    overrides: dict[str, Any] | str | None = None,
    experiment: str = "",
    run_name: str = "",
    parent_run_id: str = "",
    smoke: bool = False,
) -> RunConfig:
    """The notebook's parameters -> a validated config. Empty strings leave the preset's value."""
    pairs = {**(SMOKE if smoke else {}), **as_overrides(overrides)}
    named = {"tracking.experiment": experiment, "tracking.run_name": run_name, "tracking.parent_run_id": parent_run_id}
    pairs |= {key: value for key, value in named.items() if value}
    return load(preset, pairs)


def torchrun_command(config_file: Path, nproc: int) -> list[str]:
    """One node, ``nproc`` processes, this interpreter; ``--resume auto`` continues the named run."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)),
        *("-m", "vqlab.train", "--config", str(config_file), "--resume", "auto"),
    ]


def train(cfg: RunConfig, nproc: int = 1) -> RunFolder:
    """Train ``cfg`` (continuing the run named by ``tracking.run_name`` if it was started) and
    return its folder: in this process for ``nproc == 1``, else through ``torchrun`` with
    ``nproc`` processes, after which this process reads the folder the run wrote."""
    if nproc < 1:
        raise ConfigError("nproc", f"must be >= 1, got {nproc}")
    resume = "auto" if cfg.tracking.run_name else None
    if nproc == 1:
        return RunFolder(fit(cfg, resume=resume).run_dir)
    if resume is None:
        raise ConfigError("tracking.run_name", f"nproc={nproc} needs a run name, so this process finds the run")
    with tempfile.TemporaryDirectory() as folder:
        config_file = Path(folder) / CONFIG_FILE
        config_file.write_text(to_yaml(cfg))
        code = subprocess.run(torchrun_command(config_file, nproc)).returncode
    if code != 0:
        raise TrainingFailedError(f"torchrun with {nproc} processes exited with status {code}")
    return RunFolder.of(cfg)


def evaluate_checkpoint(run: RunFolder, split: str = "val"):
    """The run's newest checkpoint measured by ``vqlab.evaluate`` on its ``val`` split (writes
    ``eval.json``) or on its first training crops (``train``: ``eval_train.json``, the
    reconstruction and codebook metrics only); logs to the run's MLflow run."""
    from vqlab.evaluate import evaluate_run

    return evaluate_run(run.path, metrics=TRAIN_SPLIT_METRICS if split == "train" else None, split=split)


# --- headless execution -------------------------------------------------------------------------
def kernel_dir() -> Path:
    """A Jupyter data folder holding the ``vqlab`` kernel spec for this interpreter (one folder per
    interpreter, in the temporary directory, so nothing is installed into the environment)."""
    digest = hashlib.sha256(sys.executable.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"vqlab-jupyter-{digest}"
    spec = folder / "kernels" / KERNEL / "kernel.json"
    text = json.dumps(
        {
            # the kernel's own log (a shutdown's "KeyboardInterrupt caught in kernel") is not the
            # user's business; what a cell prints or raises goes into the notebook
            "argv": [
                *(sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"),
                "--IPKernelApp.log_level=CRITICAL",
            ],
            "display_name": f"vqlab ({sys.executable})",
            "language": "python",
        }
    )
    if not spec.is_file() or spec.read_text() != text:
        spec.parent.mkdir(parents=True, exist_ok=True)
        partial = spec.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(spec)  # atomic: concurrent drivers never read half a spec
    return folder


@contextlib.contextmanager
def own_kernel() -> Iterator[str]:
    """``JUPYTER_PATH`` starting with ``kernel_dir()`` while papermill resolves and starts the kernel."""
    before = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(kernel_dir()), before) if p)
    try:
        yield KERNEL
    finally:
        if before is None:
            del os.environ["JUPYTER_PATH"]
        else:
            os.environ["JUPYTER_PATH"] = before


KERNEL_STARTS = 3  # tries to start a kernel: a busy machine can lose one before it answers


def kernel_manager_class():
    """Kernels talk to papermill over IPC sockets in the Jupyter runtime folder, not TCP: no port
    is picked, so two kernels starting at once on one machine (shards, submitit's local jobs)
    cannot take the same one, and the kernel has no unencrypted-TCP warning to print."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            # the sockets' own path prefix: jupyter_client's default can be "kernel-ipc" in the current
            # folder, where two kernels starting at once would pick the same socket files
            ip = str(Path(tempfile.gettempdir()) / f"vqlab-kernel-{uuid.uuid4().hex}")
            super().__init__(**{"transport": "ipc", "ip": ip, **kwargs})

    return IPCKernelManager


def kernel_failed_to_start(err: BaseException) -> bool:
    """A kernel that died or did not answer before any cell ran (not a failing cell)."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        return False
    text = str(err)
    return "before replying to kernel_info" in text or "Kernel didn't respond" in text


def execute(parameters: dict[str, Any], output: Path, notebook: Path = NOTEBOOK, cwd: Path | None = None) -> None:
    """Run ``notebook`` with ``parameters`` into ``output``; papermill writes it cell by cell and
    raises ``PapermillExecutionError`` (cell, error, traceback) when a cell fails. A kernel that
    dies before it answers is started again, up to ``KERNEL_STARTS`` times."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, KERNEL_STARTS + 1):
        try:
            with own_kernel() as kernel:
                papermill.execute_notebook(
                    str(notebook),
                    str(output),
                    parameters=parameters,
                    kernel_name=kernel,
                    progress_bar=False,
                    cwd=str(cwd or Path.cwd()),
                    start_timeout=120,
                    kernel_manager_class=kernel_manager_class(),
                )
            return
        except Exception as err:
            if attempt == KERNEL_STARTS or not kernel_failed_to_start(err):
                raise
            print(f"{output}: the kernel did not start ({err}); starting it again", file=sys.stderr)
