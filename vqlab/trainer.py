"""Train one VQ autoencoder (``python -m vqlab.train`` is its command line; ``vqlab.fit`` in Python).

``fit(cfg)`` is the whole recipe in one function with visible sections: setup, build, resume,
first reads, loop, eval, checkpoint. Nothing is written until everything a run needs to start has
been read once (the config, the weights, a checkpoint to continue, the first training batch, the
validation set); then the run folder (``vqlab.runfolder.RunFolder``) receives ``config.yaml``,
``metrics.jsonl``, ``figures/``, ``checkpoints/`` and the code histograms, and MLflow the same.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from vqlab import checkpoint, data, distributed, evaluators, quantizers
from vqlab.config import OptimConfig, RunConfig, flat_params, load, presets
from vqlab.errors import MissingFileError, ResumeError, RunExistsError, UserError
from vqlab.evaluators import block_mean_baseline, evaluate
from vqlab.losses import Objective
from vqlab.models import VQAutoencoder, build_autoencoder
from vqlab.optim import build_optimizer, build_schedule, skip_step_if
from vqlab.runfolder import RunFolder
from vqlab.runtime import ModelEMA, autocast, seed_everything
from vqlab.schema import flatten, to_dict
from vqlab.state import TrainState
from vqlab.tracking import RunLogger, headline, mlflow_uri, summary_table


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the run stops and its checkpoints stay as they are."""


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
            return Start(folder=run)
    else:
        path = Path(resume)
        run = RunFolder(path.parent.parent if path.is_file() else path)
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
    if start.checkpoint is None:
        run.write_config(cfg)
    checkpoint.remove_temporaries(run.checkpoints)
    return run


def batches(
    loader: DataLoader, epoch: int, skip: int, device: torch.device | None = None
) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """Endless training batches from batch ``skip`` of ``epoch`` on, each with the position of
    the batch that follows it (what a checkpoint must record to resume exactly); made on
    ``device`` by the dataset itself when given (``data.on_device``)."""
    while True:
        data.set_epoch(loader, epoch, skip)
        source = loader if device is None else data.device_batches(loader, device)
        for index, images in enumerate(source, start=skip + 1):
            yield images, (epoch, index)
        epoch, skip = epoch + 1, 0


def no_sync_unless(module: torch.nn.Module, sync: bool):
    """DDP's ``no_sync`` on all but the last micro-batch of an optimizer step, so gradients are
    all-reduced once per step; a plain module has nothing to skip."""
    return module.no_sync() if isinstance(module, DDP) and not sync else nullcontext()


def accumulate(window: dict[str, torch.Tensor], values: dict[str, torch.Tensor], micro_batches: int) -> None:
    """Average detached per-micro-batch values over an optimizer step, for logging."""
    for name, value in values.items():
        window[name] = window.get(name, 0.0) + value.detach().float() / micro_batches


class IntervalMeans:
    """Per-step values summed on the device between two log lines; ``read`` averages them over
    the steps and over all ranks with one all-reduce (so ``train/*`` metrics are the whole job's,
    not rank 0's) and starts a new interval. Every rank calls ``read`` at the same steps."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1

    def read(self) -> dict[str, float]:
        names = sorted(self.sums)  # the same names on every rank: they come from the same code paths
        if not names:
            return {}
        totals = distributed.all_reduce_sum_(torch.stack([self.sums[n] for n in names]))
        means = (totals / distributed.world_size()).tolist()
        values = {n: m / self.counts[n] for n, m in zip(names, means, strict=True)}
        self.sums, self.counts = {}, {}
        return values


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
        values = torch.stack([torch.full_like(loss, step, dtype=torch.float64), loss.double(), grad_norm.double()])
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first = torch.where(bad & (self.first[0] == 0), values, self.first)
        skip_step_if(optimizer, bad)

    def check(self, checkpoints: Path) -> None:
        bad = [row for row in distributed.all_gather_cat(self.first[None]).tolist() if row[0] > 0]
        if not bad:
            return
        step, loss, grad_norm = min(bad)
        kept = checkpoint.step_files(checkpoints)
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
        raise NonFiniteLossError(f"non-finite loss {loss}, grad norm {grad_norm} at step {int(step)}; {where}")


@torch.no_grad()
def save_reconstruction_grid(model: VQAutoencoder, images: torch.Tensor, path: Path, dtype: str) -> None:
    """Originals on the top row, reconstructions below."""
    from torchvision.utils import save_image

    was_training = model.training
    model.eval()
    with autocast(images.device, dtype):
        reconstruction = model(images).reconstruction.float()
    model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = torch.cat([images, reconstruction.clamp(-1, 1)]).add(1).div(2)
    save_image(grid.cpu(), path, nrow=len(images), padding=1)


def fit(cfg: RunConfig, resume: str | None = None, restart: bool = False) -> TrainResult:
    """Train as ``cfg`` says. ``resume``: ``"auto"`` (continue the run named by
    ``tracking.run_name``, from step 0 if it has no checkpoint yet), a run folder, or a checkpoint
    file to continue from exactly. ``restart``: start the named run again from step 0, its earlier
    checkpoints set aside (the way out when none of them loads)."""
    # --- setup -----------------------------------------------------------------------------
    ctx = distributed.setup(cfg.train.device)
    device = ctx.device
    seed_everything(cfg.train.seed)
    splits = data.build_datasets(cfg.data, cfg.train.seed)
    train_loader = data.train_loader(
        splits.train, cfg.data, cfg.train.seed, ctx.rank, ctx.world_size, device.type == "cuda"
    )
    val_loader = data.val_loader(splits.val, cfg.data, ctx.rank, ctx.world_size)
    quantizer = quantizers.build(cfg.quantizer)
    quantizer.hooks_driven_by_caller()  # the loop below calls on_optimizer_step once per optimizer step
    objective = Objective(cfg.loss).to(device)
    metrics = evaluators.build(cfg.eval.metrics, quantizer.radices, device, cfg.eval)
    start = distributed.on_main(lambda: plan_start(cfg, resume, restart))

    # --- build -----------------------------------------------------------------------------
    model = build_autoencoder(cfg.model, quantizer).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, device)
    schedule = build_schedule(optimizer, cfg.optim, cfg.train.steps)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    # DDP must not broadcast buffers: EMA codebooks and usage counters are the quantizer's own,
    # kept identical by its collectives in on_optimizer_step.
    train_model = DDP(model, broadcast_buffers=False) if distributed.initialized() else model
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    adversary, disc_optimizer = objective.adversary, None
    if adversary is not None:
        adversarial = cfg.loss.adversarial
        disc_cfg = OptimConfig(name="adam", lr=adversarial.lr, betas=adversarial.betas, schedule="constant")
        disc_optimizer = build_optimizer(adversary, disc_cfg, device)
        disc_model = DDP(adversary.discriminator) if distributed.initialized() else adversary.discriminator
    state = TrainState(model, optimizer, schedule, device, ema, adversary, disc_optimizer)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    # --- resume ----------------------------------------------------------------------------
    if start.checkpoint is not None:
        state.load_state_dict(checkpoint.load(start.checkpoint, device))
    if state.step >= cfg.train.steps:  # nothing left to do: report what the run recorded
        run = start.folder
        distributed.teardown()
        if ctx.main:
            print(f"{run.path} is complete at step {state.step} ({start.checkpoint})", file=sys.stderr)
        recorded = run.last_metrics(("val/", "val_ema/"))
        return TrainResult(run.path, recorded, run.last_metrics(("baseline",)), start.checkpoint)

    # --- first reads: every rank's first batches and the whole validation set, before anything is written
    data.check_first_batches(train_loader, val_loader)
    stream = batches(train_loader, *state.position, device if cfg.data.on_device else None)
    # one code per token: compare with one palette colour per token-sized block
    budget = quantizer.codebook_size if quantizer.discrete else 2**24
    baseline = block_mean_baseline(val_loader, device, model.downsample, budget)
    grid_images = torch.stack([splits.val[i] for i in range(min(cfg.eval.grid_images, len(splits.val)))]).to(device)

    run = distributed.on_main(lambda: open_folder(cfg, start))
    resume_step = state.step if start.checkpoint is not None else None
    logger = RunLogger(cfg.tracking, run, cfg.train.steps, flat_params(cfg), active=ctx.main, resume_step=resume_step)
    logger.artifact(run.config_file)
    logger.advance(state.step)
    if start.checkpoint is not None:
        logger.print(f"resumed {run.path} from {start.checkpoint} at step {state.step}")
    else:
        params = sum(p.numel() for p in model.parameters())
        shape = {"model/params": params, "model/tokens": cfg.model.tokens(cfg.data.image_size)}
        if quantizer.discrete:  # what a comparison across codebook shapes puts on its x axis
            shape["model/bits_per_token"] = sum(math.log2(r) for r in quantizer.radices)
        logger.log({**shape, **baseline}, step=0)
        initial = evaluate(model, val_loader, metrics, device, cfg.train.dtype, "val")
        logger.log(initial, step=0)
        logger.print(validation_line(0, initial))

    def save_checkpoint() -> None:
        saved = state.state_dict()  # gathers every rank's RNG state
        distributed.check_in_sync(model, f"step {state.step}")
        if adversary is not None:
            distributed.check_in_sync(adversary, f"step {state.step} (discriminator)")
        if ctx.main:
            saved["config"] = to_dict(cfg)
            checkpoint.save_step(saved, run.checkpoints, state.step, cfg.train.keep_checkpoints)

    # --- loop ------------------------------------------------------------------------------
    model.train()
    val_metrics: dict[str, float] = {}
    interval = IntervalMeans()
    guard = FiniteGuard(device)
    status = "FAILED"
    state.restore_rng()
    try:
        tick, seen = time.perf_counter(), 0
        while state.step < cfg.train.steps:
            step = state.step
            quantizer.set_step(step, cfg.train.steps)
            window: dict[str, torch.Tensor] = {}
            pairs = []  # (real, reconstruction) micro-batches for the discriminator
            for micro in range(cfg.train.grad_accum):
                images, state.position = next(stream)
                images = images.to(device, non_blocking=True)
                with no_sync_unless(train_model, micro == cfg.train.grad_accum - 1):
                    with autocast(device, cfg.train.dtype):
                        out = train_model(images)
                        losses, stats = objective(out.reconstruction, images, step, model.last_layer())
                    losses |= out.quant.losses
                    loss = sum(losses.values())
                    (loss / cfg.train.grad_accum).backward()
                accumulate(window, {"loss": loss, **losses, **stats, **out.quant.stats}, cfg.train.grad_accum)
                if objective.adversarial_active(step):
                    pairs.append((images, out.reconstruction.detach()))
                seen += len(images)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            guard.watch(step + 1, window["loss"], grad_norm, optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            quantizer.on_optimizer_step()
            if ema is not None:
                ema.update(model)
            for micro, (real, fake) in enumerate(pairs):
                with no_sync_unless(disc_model, micro == len(pairs) - 1):
                    with autocast(device, cfg.train.dtype):
                        disc_loss = adversary.discriminator_term(disc_model, real, fake)
                    (disc_loss / len(pairs)).backward()
                accumulate(window, {"disc_loss": disc_loss}, len(pairs))
            if pairs:
                disc_optimizer.step()
                disc_optimizer.zero_grad(set_to_none=True)
            schedule.step()
            interval.add({**window, "grad_norm": grad_norm})
            state.step = step = step + 1
            logger.advance()
            last = step == cfg.train.steps
            log_now = last or step % cfg.train.log_every == 0
            eval_now = last or bool(cfg.eval.every and step % cfg.eval.every == 0)
            save_now = last or bool(cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
            if log_now or eval_now or save_now:
                guard.check(run.checkpoints)

            if log_now:
                logged = {f"train/{k}": v for k, v in interval.read().items()}
                logged["train/lr"] = schedule.get_last_lr()[0]
                logged["train/images_per_s"] = seen * ctx.world_size / (time.perf_counter() - tick)
                if device.type == "cuda":
                    logged["train/peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(logged, step=step)
                tick, seen = time.perf_counter(), 0

            # --- eval --------------------------------------------------------------------------
            if eval_now:
                val_metrics = evaluate(model, val_loader, metrics, device, cfg.train.dtype, "val")
                if step == cfg.train.steps:  # the final code histogram, for the analysis studies
                    for path in metrics.save(run.path):
                        logger.artifact(path)
                if ema is not None:
                    val_metrics |= evaluate(ema.module, val_loader, metrics, device, cfg.train.dtype, "val_ema")
                    if step == cfg.train.steps:  # the EMA's own histogram, beside the model's
                        for path in metrics.save(run.path, prefix="ema_"):
                            logger.artifact(path)
                logger.log(val_metrics, step=step)
                logger.print(validation_line(step, val_metrics))

            # --- checkpoint --------------------------------------------------------------------
            if save_now:
                save_checkpoint()

        if ctx.main:
            figure = run.figure("reconstructions.png")
            save_reconstruction_grid(model, grid_images, figure, cfg.train.dtype)
            logger.artifact(figure, "figures")
        status = "FINISHED"
    finally:
        logger.close(status)
        distributed.teardown()
    return TrainResult(run_dir=run.path, metrics=val_metrics, baseline=baseline, resumed_from=start.checkpoint)


def validation_line(step: int, metrics: dict[str, float]) -> str:
    """``step 500 val: l1 0.0544  psnr 23.95 ...``: the headline metrics of each evaluated model."""
    parts = []
    for prefix in ("val", "val_ema"):
        shown = headline(metrics, prefix)
        if shown:
            parts.append(f"{prefix}: " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return f"step {step} " + "  |  ".join(parts)


def final_table(result: TrainResult) -> str:
    """The final headline metrics beside the two trivial codecs, as an aligned table."""
    rows = {"model": headline(result.metrics, "val")}
    if any(k.startswith("val_ema/") for k in result.metrics):
        rows["model EMA"] = headline(result.metrics, "val_ema")
    rows["block mean colour"] = headline(result.baseline, "baseline")
    rows["block mean, palette"] = headline(result.baseline, "baseline_palette")
    return summary_table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vqlab.train",
        description="Train a VQ image tokenizer. Overrides are dotted key=value pairs, e.g. "
        "quantizer.levels=[8,5,5,5] train.steps=200 optim.lr=3e-4",
    )
    parser.add_argument("--config", default="default", help=f"a preset ({', '.join(presets())}) or a YAML file")
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue a run: 'auto' = the run named by tracking.run_name (from step 0 if it has no "
        "checkpoint yet), a run folder (its newest readable checkpoint) or a checkpoint file (exactly that one)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start the run named by tracking.run_name again from step 0; its earlier checkpoints are set aside",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        result = fit(cfg, resume=args.resume, restart=args.restart)
    except UserError as err:  # bad input is one line; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    print(f"run folder:   {result.run_dir}")
    if cfg.tracking.mlflow:
        print(f"mlflow store: {mlflow_uri(cfg.tracking)}")
    print(final_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
