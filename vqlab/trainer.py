"""Train one VQ autoencoder (``python -m vqlab.train`` is its command line; ``vqlab.fit`` in Python).

``fit(cfg)`` is the recipe: setup, first reads, then open, loop and finish. Nothing is written
until everything a run needs to start has been read once (the config, the weights, a checkpoint to
continue, the first training batch, the validation set). The run's lifecycle (where it starts, its
folder and records, checkpoints, the end phase) is ``vqlab.lifecycle.RunLifecycle``'s; this module
holds the training itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from vqlab import data, distributed, evaluators, quantizers
from vqlab.config import OptimConfig, RunConfig, load, presets
from vqlab.errors import UserError
from vqlab.evaluators import block_mean_baseline, code_budget, training_palette
from vqlab.lifecycle import FiniteGuard, NonFiniteLossError, RunLifecycle, TrainResult, Validation
from vqlab.losses import Objective
from vqlab.models import build_autoencoder
from vqlab.optim import build_optimizer, build_schedule
from vqlab.runtime import ModelEMA, autocast, seed_everything
from vqlab.showcase import ShowcaseCrops
from vqlab.state import TrainState
from vqlab.tracking import TRIVIAL_CODECS, headline, mlflow_uri, summary_table

__all__ = ["FiniteGuard", "NonFiniteLossError", "TrainResult", "fit", "main"]


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


@dataclass
class Networks:
    """What the loop steps: the train state (whose model is the plain module), and the modules the
    forward passes go through (DDP and ``torch.compile`` applied here, in one place)."""

    state: TrainState
    train_model: torch.nn.Module
    disc_model: torch.nn.Module | None  # the discriminator as its passes see it; None without a GAN loss


def build_networks(cfg: RunConfig, quantizer: quantizers.Quantizer, objective: Objective, device) -> Networks:
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
    adversary, disc_model, disc_optimizer = objective.adversary, None, None
    if adversary is not None:
        betas = cfg.loss.adversarial.betas
        disc_cfg = OptimConfig(name="adam", lr=cfg.loss.adversarial.lr, betas=betas, schedule="constant")
        disc_optimizer = build_optimizer(adversary, disc_cfg, device)
        disc_model = DDP(adversary.discriminator) if distributed.initialized() else adversary.discriminator
    state = TrainState(model, optimizer, schedule, device, ema, adversary, disc_optimizer)
    return Networks(state, train_model, disc_model)


def discriminator_step(nets: Networks, pairs: list, window: dict[str, torch.Tensor], dtype: str) -> None:
    """One optimizer step of the discriminator on the step's (real, reconstruction) micro-batches."""
    state = nets.state
    for micro, (real, fake) in enumerate(pairs):
        with no_sync_unless(nets.disc_model, micro == len(pairs) - 1):
            with autocast(state.device, dtype):
                disc_loss = state.adversary.discriminator_term(nets.disc_model, real, fake)
            (disc_loss / len(pairs)).backward()
        accumulate(window, {"disc_loss": disc_loss}, len(pairs))
    state.disc_optimizer.step()
    state.disc_optimizer.zero_grad(set_to_none=True)


def fit(cfg: RunConfig, resume: str | None = None, restart: bool = False) -> TrainResult:
    """Train as ``cfg`` says. ``resume``: ``"auto"`` (continue the run named by
    ``tracking.run_name``, from step 0 if it has no checkpoint yet), a run folder, or a checkpoint
    file to continue from exactly. ``restart``: start the named run again from step 0, its earlier
    checkpoints set aside (the way out when none of them loads)."""
    # --- setup: data, quantizer, objective, evaluators, where the run starts, the networks ----------
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
    quantizer.finiteness_checked_by_caller()  # a NaN token makes the loss NaN, which FiniteGuard stops on
    objective = Objective(cfg.loss).to(device)
    suite = evaluators.build(cfg.eval.metrics, quantizer.radices, device, cfg.eval)
    run = RunLifecycle(cfg, ctx, Validation(val_loader, suite, device, cfg.train.dtype), resume, restart)
    nets = build_networks(cfg, quantizer, objective, device)
    state, model = nets.state, nets.state.model
    run.restore(state)
    if (recorded := run.recorded(state)) is not None:  # trained and finished: report what it recorded
        distributed.teardown()
        return recorded

    # --- first reads: every rank's first batches and the whole validation set, before anything is written
    data.check_first_batches(train_loader, val_loader)
    stream = batches(train_loader, *state.position, device if cfg.data.on_device else None)
    # one code per token: compare with one palette colour per token-sized block
    budget = code_budget(quantizer)
    palette = training_palette(cfg.data, cfg.train.seed, splits.train, model.downsample, budget)
    baseline = block_mean_baseline(val_loader, device, model.downsample, budget, palette)
    shown = ShowcaseCrops.of(splits.val, cfg.eval.grid_images, model.downsample, budget, palette, device)

    # --- open, loop, finish --------------------------------------------------------------------------
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    steps, accum = cfg.train.steps, cfg.train.grad_accum
    interval, guard = IntervalMeans(), FiniteGuard(device)
    try:
        with run.open(state, model, baseline) as logger:
            model.train()
            state.restore_rng()
            tick, seen = time.perf_counter(), 0
            while state.step < steps:
                # --- one optimizer step: micro-batches, clip, step, the quantizer's and EMA's updates
                step = state.step
                quantizer.set_step(step, steps)
                last = step + 1 == steps
                log_now = last or (step + 1) % cfg.train.log_every == 0
                # the batch statistics are read at log lines only (a train/ mean over that step's batches)
                quantizer.batch_stats_wanted(log_now)
                window: dict[str, torch.Tensor] = {}
                pairs = []  # (real, reconstruction) micro-batches for the discriminator
                for micro in range(accum):
                    images, state.position = next(stream)
                    images = images.to(device, non_blocking=True)
                    with no_sync_unless(nets.train_model, micro == accum - 1):
                        with autocast(device, cfg.train.dtype):
                            out = nets.train_model(images)
                            losses, stats = objective(out.reconstruction, images, step, model.last_layer())
                        losses |= out.quant.losses
                        loss = sum(losses.values())
                        (loss / accum).backward()
                    accumulate(window, {"loss": loss, **losses, **stats, **out.quant.stats}, accum)
                    if objective.adversarial_active(step):
                        pairs.append((images, out.reconstruction.detach()))
                    seen += len(images)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                guard.watch(step + 1, window["loss"], grad_norm, state.optimizer)
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
                quantizer.on_optimizer_step()
                if state.ema is not None:
                    state.ema.update(model)
                if pairs:
                    discriminator_step(nets, pairs, window, cfg.train.dtype)
                state.schedule.step()
                interval.add({**window, "grad_norm": grad_norm})
                state.step = step = step + 1
                logger.advance()

                # --- log, validate, checkpoint (the final validation is the end phase's) ----------
                eval_now = not last and bool(cfg.eval.every and step % cfg.eval.every == 0)
                save_now = last or bool(cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
                if log_now or eval_now or save_now:
                    guard.check(run.run.checkpoints)
                if log_now:
                    logged = {f"train/{k}": v for k, v in interval.read().items()}
                    logged["train/lr"] = state.schedule.get_last_lr()[0]
                    logged["train/images_per_s"] = seen * ctx.world_size / (time.perf_counter() - tick)
                    if device.type == "cuda":
                        logged["train/peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    logger.log(logged, step=step)
                    tick, seen = time.perf_counter(), 0
                if eval_now:
                    run.validate(step, model, state.ema.module if state.ema is not None else None)
                if save_now:
                    run.save(state)
            return run.finish(state, shown, baseline)
    finally:
        distributed.teardown()


def final_table(result: TrainResult) -> str:
    """The final headline metrics beside the trivial codecs, as an aligned table."""
    rows = {"model": headline(result.metrics, "val")}
    if any(k.startswith("val_ema/") for k in result.metrics):
        rows["model EMA"] = headline(result.metrics, "val_ema")
    rows |= {label: headline(result.baseline, prefix) for prefix, label in TRIVIAL_CODECS.items()}
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
    except NonFiniteLossError as err:  # a diverged run: its step and the last good checkpoint
        print(f"error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    print(f"run folder:   {result.run_dir}")
    if cfg.tracking.mlflow:
        print(f"mlflow store: {mlflow_uri(cfg.tracking)}")
    print(final_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
