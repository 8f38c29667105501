"""A run's lifecycle, beside its folder (``RunFolder``) and its checkpoints (``checkpoint``).

``RunLifecycle`` does everything a training run does besides training:

- ``plan`` (reads only): where the run starts: a new folder, a named one, a resumed one and
  from which checkpoint, or a restart; a resumed run must have been started with the same config.
- ``restore``: the train state from that checkpoint.
- ``open`` (the first write): make or reopen the folder, write ``config.yaml``, open
  ``metrics.jsonl`` and the MLflow run, record the runtime (threads, torch, device), and, for a
  new run, the step-0 records (model shape, trivial codecs, first validation).
- ``validate`` and ``save`` during the loop.
- ``finish``: the final validation (with the code histograms), the shown crops' reconstructions
  and their figure, the
  MLflow run's end, then the folder's ``finished`` mark. A run whose training is complete but
  whose end phase was cut short (a kill after the final checkpoint) does the end phase when it is
  resumed; a run with the mark reports what it recorded.

Nothing is written before ``open``, which the trainer calls once everything the run needs has
been read (config, weights, checkpoint, first batches, validation set).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vqlab import checkpoint, distributed
from vqlab.config import RunConfig, flat_params
from vqlab.errors import MissingFileError, ResumeError, RunExistsError
from vqlab.evaluators import Suite, measure_with_ema
from vqlab.models import VQAutoencoder
from vqlab.runfolder import RunFolder
from vqlab.runtime import runtime_record
from vqlab.schema import flatten, to_dict
from vqlab.showcase import DPI, ShowcaseCrops, run_figure
from vqlab.state import TrainState
from vqlab.tracking import RunLogger, headline


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradient norm or the weights became NaN/inf; the run stops and its
    checkpoints stay as they are."""


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]  # the final validation metrics, "val/..." (and "val_ema/...") keys
    baseline: dict[str, float]  # trivial block-mean codecs measured the same way, "baseline*/..."
    resumed_from: Path | None = None  # the checkpoint this process continued from


@dataclass(frozen=True)
class Start:
    """Where a run starts: its folder (``None``: a new, unnamed one), the checkpoint to continue
    from (``None``: step 0) and whether the folder's earlier records are set aside first."""

    folder: RunFolder | None
    checkpoint: Path | None = None
    restart: bool = False


def check_same_config(run: RunFolder, cfg: RunConfig) -> None:
    """A resumed run must be the run that was started; only ``tracking`` may differ."""
    saved = flatten(to_dict(run.read_config()))
    wanted = flatten(to_dict(cfg))
    changed = sorted(
        k for k in saved.keys() | wanted.keys() if not k.startswith("tracking.") and saved.get(k) != wanted.get(k)
    )
    if changed:
        raise ResumeError(f"cannot resume {run.path} with a different config: {', '.join(changed)}")


def newest_checkpoint(run: RunFolder, restart: bool) -> Path | None:
    """The newest readable checkpoint of ``run``; ``None`` when it has none (a run killed before
    its first checkpoint starts again from step 0 in its own folder). When checkpoints exist but
    none loads, that is an error unless ``restart``: silently starting over would mix two runs."""
    files = checkpoint.step_files(run.checkpoints)
    if not files or restart:
        return None
    found = checkpoint.latest_valid(run.checkpoints)
    if found is None:
        names = ", ".join(str(p) for p in files)
        raise ResumeError(
            f"no checkpoint of {run.path} loads ({names}); move them away, or pass --restart "
            "(restart=True) to start the run again from step 0 with its checkpoints set aside"
        )
    return found[0]


def plan_start(cfg: RunConfig, resume: str | None, restart: bool) -> Start:
    """Where to start, from what is on disk; reads only.

    ``resume=None``: a new run, in the folder named by ``tracking.run_name`` (made beforehand by a
    driver or not; one holding another run's ``config.yaml`` is an error unless ``restart``) or in
    a new timestamped folder. ``"auto"``: the folder named by ``tracking.run_name``, whatever it
    holds: its newest readable checkpoint, or step 0 when it has none. A run folder or a
    checkpoint file: that run, from its newest checkpoint or from exactly that file."""
    root = Path(cfg.tracking.root)
    if root.exists() and not root.is_dir():
        raise MissingFileError(f"tracking.root {root} is a file; name the folder that holds the runs")
    if restart and not cfg.tracking.run_name and resume in (None, "auto"):
        raise ResumeError("--restart needs tracking.run_name, the run to start again")
    if resume is None:
        if not cfg.tracking.run_name:
            return Start(folder=None)
        run = RunFolder.of(cfg)
        if run.has_config() and not restart:
            raise RunExistsError(
                f"run {run.path} exists; continue it with --resume auto, start it again with --restart, "
                "or choose another tracking.run_name"
            )
        return Start(folder=run, restart=restart)
    if resume == "auto":
        if not cfg.tracking.run_name:
            raise ResumeError("--resume auto needs tracking.run_name, the run to continue")
        run = RunFolder.of(cfg)
        if not run.has_config():
            if restart:
                raise ResumeError(f"--restart: there is no run {run.path} to start again; leave out --restart")
            return Start(folder=run)
    else:
        path = Path(resume)
        run = RunFolder.of_checkpoint(path) if path.is_file() else RunFolder(path)
        if not run.has_config():
            raise MissingFileError(f"--resume {resume}: no run folder ({run.config_file.name}) at {run.path}")
        if path.is_file():
            check_same_config(run, cfg)
            return Start(folder=run, checkpoint=path, restart=restart)
    if not restart:
        check_same_config(run, cfg)
    return Start(folder=run, checkpoint=newest_checkpoint(run, restart), restart=restart)


def open_folder(cfg: RunConfig, start: Start) -> RunFolder:
    """The run's folder, ready to be written: made if new, earlier checkpoints set aside on a
    restart, the config written unless the run continues."""
    run = start.folder or RunFolder.new(cfg)
    if start.restart:
        aside = checkpoint.set_aside(run.checkpoints)
        if aside is not None:
            print(f"restart: the earlier checkpoints of {run.path} are in {aside}", file=sys.stderr)
        run.clear_finished()
    if start.checkpoint is None:
        run.write_config(cfg)
    checkpoint.remove_temporaries(run.checkpoints)
    return run


@dataclass
class Validation:
    """The validation crops, the evaluators and the precision a model is measured in."""

    loader: DataLoader
    suite: Suite
    device: torch.device
    dtype: str

    def __call__(self, model, ema=None, save_to: Path | None = None) -> tuple[dict[str, float], list[Path]]:
        """``val/*`` of ``model`` and ``val_ema/*`` of ``ema``; with ``save_to``, their code
        histograms written there (the EMA's with the ``ema_`` prefix)."""
        return measure_with_ema(model, ema, self.loader, self.suite, self.device, self.dtype, "val", save_to)


class RunLifecycle:
    """One training run's folder, records, checkpoints and end phase (see the module docstring).
    Every rank constructs it and calls every method; what touches the folder runs on rank 0."""

    def __init__(
        self,
        cfg: RunConfig,
        ctx: distributed.Context,
        validation: Validation,
        resume: str | None = None,
        restart: bool = False,
    ):
        self.cfg, self.ctx, self.validation = cfg, ctx, validation
        self.start = distributed.on_main(lambda: plan_start(cfg, resume, restart))
        self.run: RunFolder | None = None
        self.logger: RunLogger | None = None

    # --- before anything is written ---------------------------------------------------------------
    def restore(self, state: TrainState) -> None:
        """Load the checkpoint the run continues from (nothing for a new run)."""
        if self.start.checkpoint is not None:
            state.load_state_dict(checkpoint.load(self.start.checkpoint, state.device))

    def recorded(self, state: TrainState) -> TrainResult | None:
        """What a finished run recorded, when this one is finished (training and end phase);
        ``None`` when there is training or end phase left to do."""
        folder = self.start.folder
        if state.step < self.cfg.train.steps or not distributed.on_main(lambda: folder.is_finished()):
            return None
        if self.ctx.main:
            print(f"{folder.path} is complete at step {state.step} ({self.start.checkpoint})", file=sys.stderr)
        recorded = folder.last_metrics(("val/", "val_ema/"))
        return TrainResult(folder.path, recorded, folder.last_metrics(("baseline",)), self.start.checkpoint)

    # --- the first write ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def open(self, state: TrainState, model: VQAutoencoder, baseline: dict[str, float]) -> Iterator[RunLogger]:
        """Make or reopen the folder and the records; yield the logger. A run that leaves the
        block with an error ends its MLflow run FAILED (``finish`` ends it FINISHED)."""
        cfg, start = self.cfg, self.start
        self.run = run = distributed.on_main(lambda: open_folder(cfg, start))
        resumed = start.checkpoint is not None
        self.logger = logger = RunLogger(
            cfg.tracking,
            run,
            cfg.train.steps,
            flat_params(cfg),
            active=self.ctx.main,
            resume_step=state.step if resumed else None,
            resume_rows=state.records if resumed else None,
        )
        logger.record_runtime(runtime_record(state.device, self.ctx.world_size))
        logger.artifact(run.config_file)
        logger.advance(state.step)
        if resumed:
            logger.print(f"resumed {run.path} from {start.checkpoint} at step {state.step}")
        else:
            params = sum(p.numel() for p in model.parameters())
            shape = {"model/params": params, "model/tokens": cfg.model.tokens(cfg.data.image_size)}
            radices = model.quantizer.radices
            if model.quantizer.discrete:  # what a comparison across codebook shapes puts on its x axis
                shape["model/bits_per_token"] = sum(math.log2(r) for r in radices)
            logger.log({**shape, **baseline}, step=0)
            self.validate(0, model)
        try:
            yield logger
        except BaseException:
            logger.close("FAILED")
            raise

    # --- during the loop ----------------------------------------------------------------------------
    def validate(self, step: int, model, ema=None, save_histograms: bool = False) -> dict[str, float]:
        """Measure ``model`` (and ``ema``), log the metrics at ``step`` and print their headline;
        with ``save_histograms`` the code histograms go to the folder and MLflow."""
        metrics, files = self.validation(model, ema, self.run.path if save_histograms else None)
        for path in files:
            self.logger.artifact(path)
        self.logger.log(metrics, step=step)
        self.logger.print(validation_line(step, metrics))
        return metrics

    def save(self, state: TrainState) -> None:
        """Write the step's checkpoint, after checking that every weight is finite (a checkpoint is
        only ever a good one) and that the ranks agree."""
        FiniteGuard.check_weights(state, self.run.checkpoints)
        saved = state.state_dict()  # gathers every rank's RNG state
        distributed.check_in_sync(state.model, f"step {state.step}")
        if state.adversary is not None:
            distributed.check_in_sync(state.adversary, f"step {state.step} (discriminator)")
        if self.ctx.main:
            saved["records"] = self.logger.rows
            checkpoint.save_step(saved, self.run.checkpoints, state.step, self.cfg.train.keep_checkpoints)

    # --- the end phase --------------------------------------------------------------------------------
    def finish(self, state: TrainState, shown: ShowcaseCrops, baseline: dict[str, float]) -> TrainResult:
        """The final validation of the model (and its EMA) with the code histograms, the shown
        crops' reconstructions (``reconstructions.npz``) and their figure, the MLflow run FINISHED,
        then the folder's ``finished`` mark."""
        ema = state.ema.module if state.ema is not None else None
        metrics = self.validate(state.step, state.model, ema, save_histograms=True)
        if self.ctx.main:
            showcase = shown.reconstruct(state.model, self.cfg.train.dtype, state.step)
            showcase.write(self.run.reconstructions)
            self.logger.artifact(self.run.reconstructions)
            path = self.run.figure("reconstructions.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            run_figure(showcase, f"{self.run.name}: validation crops at step {state.step}").savefig(path, dpi=DPI)
            self.logger.artifact(path, "figures")
        self.logger.close("FINISHED")
        if self.ctx.main:
            self.run.mark_finished(state.step)
        return TrainResult(self.run.path, metrics, baseline, self.start.checkpoint)


class FiniteGuard:
    """The loss and gradient norm of every step, watched on the device and read on the host only
    at ``check`` (log lines, evaluations, checkpoints), so that a step never waits for the device.
    The optimizer skips a non-finite step on the device (``skip_step_if``), so the weights stay
    finite until the check, which runs before any checkpoint is written: the last good checkpoint
    stays the newest. Every rank raises for the earliest non-finite step of any rank."""

    def __init__(self, device: torch.device):
        self.first = torch.zeros(3, dtype=torch.float64, device=device)  # (step, loss, grad norm); step 0: none

    def watch(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Record ``step`` if it is the first non-finite one, and have ``optimizer`` skip it."""
        from vqlab.optim import skip_step_if

        values = torch.stack([torch.full_like(loss, step, dtype=torch.float64), loss.double(), grad_norm.double()])
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first = torch.where(bad & (self.first[0] == 0), values, self.first)
        skip_step_if(optimizer, bad)

    def check(self, checkpoints: Path) -> None:
        bad = [row for row in distributed.all_gather_cat(self.first[None]).tolist() if row[0] > 0]
        if not bad:
            return
        step, loss, grad_norm = min(bad)
        raise NonFiniteLossError(
            f"non-finite loss {loss}, grad norm {grad_norm} at step {int(step)}; {last_good(checkpoints)}"
        )

    @staticmethod
    def check_weights(state: TrainState, checkpoints: Path) -> None:
        """Every weight and buffer of the model (and its EMA) finite on every rank, or stop: a
        checkpoint with a NaN or inf in it is never written, so the newest one stays a good one."""
        modules = [state.model] + ([state.ema.module] if state.ema is not None else [])
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(torch.float64)
        if distributed.all_gather_cat(finite[None]).min().item() < 1:
            raise NonFiniteLossError(f"non-finite weights at step {state.step}; {last_good(checkpoints)}")


def last_good(checkpoints: Path) -> str:
    kept = checkpoint.step_files(checkpoints)
    return f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"


def validation_line(step: int, metrics: dict[str, float]) -> str:
    """``step 500 val: l1 0.0544  psnr 23.95 ...``: the headline metrics of each evaluated model."""
    parts = []
    for prefix in ("val", "val_ema"):
        shown = headline(metrics, prefix)
        if shown:
            parts.append(f"{prefix}: " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return f"step {step} " + "  |  ".join(parts)
