"""Train one VQ autoencoder (`python -m vqlab.train` is its command line).

``train(cfg)`` is the whole recipe in one function with visible sections: setup, build, loop,
eval, checkpoint. Everything it writes goes to ``<tracking.root>/<experiment>/<run>/``:
``config.yaml`` (the single record of what ran), ``metrics.jsonl``, ``figures/`` and
``checkpoints/``, and the same metrics go to MLflow.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from vqlab import checkpoint, data, distributed, evaluators, quantizers
from vqlab.config import RunConfig, flat_params, from_yaml, load, presets, to_yaml
from vqlab.losses import Objective
from vqlab.models import VQAutoencoder, build_autoencoder
from vqlab.optim import build_optimizer, build_schedule
from vqlab.schema import ConfigError, flatten, to_dict
from vqlab.tracking import RunLogger, mlflow_uri


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]  # the final validation metrics, "val/..." (and "val_ema/...") keys
    baseline: dict[str, float]  # trivial block-mean codecs measured the same way, "baseline*/..."


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def create_run_dir(cfg: RunConfig) -> Path:
    """A new folder ``<root>/<experiment>/<run>``; an existing run is never reused or overwritten."""
    base = Path(cfg.tracking.root) / cfg.tracking.experiment
    name = cfg.tracking.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.quantizer.name}"
    for suffix in range(1000):
        run_dir = base / (name if suffix == 0 else f"{name}-{suffix}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"too many runs named {name} under {base}")


def resume_folder(cfg: RunConfig, resume: str) -> Path | None:
    """The run folder to continue: ``auto`` = the folder named by ``tracking.run_name`` if it has
    checkpoints (else start afresh); otherwise a run folder or a checkpoint file's folder."""
    if resume == "auto":
        if not cfg.tracking.run_name:
            raise ValueError("--resume auto needs tracking.run_name, the run to continue")
        run_dir = Path(cfg.tracking.root) / cfg.tracking.experiment / cfg.tracking.run_name
        return run_dir if any((run_dir / "checkpoints").glob("step_*.pt")) else None
    path = Path(resume)
    run_dir = path.parent.parent if path.is_file() else path
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume {resume}: no run folder (config.yaml) at {run_dir}")
    return run_dir


def check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """A resumed run must be the run that was started; only ``tracking`` may differ."""
    saved = flatten(to_dict(from_yaml((run_dir / "config.yaml").read_text())))
    wanted = flatten(to_dict(cfg))
    changed = sorted(
        k for k in saved.keys() | wanted.keys() if not k.startswith("tracking.") and saved.get(k) != wanted.get(k)
    )
    if changed:
        raise ValueError(f"cannot resume {run_dir} with a different config: {', '.join(changed)}")


def batches(loader: DataLoader, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """Endless training batches from batch ``skip`` of ``epoch`` on, each with the position of
    the batch that follows it (what a checkpoint must record to resume exactly)."""
    while True:
        data.set_epoch(loader, epoch, skip)
        for index, images in enumerate(loader, start=skip + 1):
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


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class ModelEMA:
    """Exponential moving average of every floating parameter and buffer (EMA codebooks
    included); integer buffers are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for average, current in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(current, 1.0 - self.decay)
            else:
                average.copy_(current)


@torch.no_grad()
def evaluate(
    model: VQAutoencoder,
    loader: DataLoader,
    metrics: evaluators.Evaluator,
    device: torch.device,
    dtype: str,
    prefix: str,
) -> dict[str, float]:
    """Run ``metrics`` (an ``evaluators.Suite``) over the whole validation set (all ranks'
    shards) from a fresh state; keys ``<prefix>/<metric>``. ``python -m vqlab.evaluate`` calls this too."""
    was_training = model.training
    model.eval()
    metrics.reset()
    for images in loader:
        images = images.to(device)
        with autocast(device, dtype):
            out = model(images)
        metrics.update(images, out.reconstruction, out.quant.codes)
    model.train(was_training)
    return {f"{prefix}/{k}": v for k, v in metrics.compute().items()}


@torch.no_grad()
def block_mean_baseline(loader: DataLoader, device: torch.device, block: int, codebook_size: int) -> dict[str, float]:
    """Pixel metrics of two trivial codecs measured like the model: each ``block x block`` patch
    replaced by its mean colour (``baseline/``), and by that colour from an RGB palette of at most
    ``codebook_size`` colours, one code per block like the tokenizer's (``baseline_palette/``)."""
    levels = evaluators.palette_levels(codebook_size)
    exact, palette = evaluators.ReconstructionMetrics(device), evaluators.ReconstructionMetrics(device)
    for images in loader:
        images = images.to(device)
        exact.update(images, evaluators.block_mean(images, block))
        palette.update(images, evaluators.block_mean(images, block, levels))
    metrics = {f"baseline/{k}": v for k, v in exact.compute().items()}
    metrics |= {f"baseline_palette/{k}": v for k, v in palette.compute().items()}
    return metrics | {"baseline_palette/colors": float(levels**3)}


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


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(cfg: RunConfig, resume: str | None = None) -> TrainResult:
    """Train as ``cfg`` says. ``resume``: ``"auto"`` (continue the run named by
    ``tracking.run_name`` if it has checkpoints) or a run folder / checkpoint path."""
    # --- setup -----------------------------------------------------------------------------
    ctx = distributed.setup(cfg.train.device)
    device = ctx.device
    seed_everything(cfg.train.seed)
    splits = data.build_datasets(cfg.data, cfg.train.seed)
    train_loader = data.train_loader(
        splits.train, cfg.data, cfg.train.seed, ctx.rank, ctx.world_size, device.type == "cuda"
    )
    val_loader = data.val_loader(splits.val, cfg.data, ctx.rank, ctx.world_size)
    # what needs weight files is built before anything is written, so a missing file leaves no trace
    quantizer = quantizers.build(cfg.quantizer)
    quantizer.hooks_driven_by_caller()  # the loop below calls on_optimizer_step once per optimizer step
    objective = Objective(cfg.loss).to(device)
    metrics = evaluators.build(cfg.eval.metrics, quantizer.radices, device, cfg.eval)
    run_dir = None
    if ctx.main:
        run_dir = resume_folder(cfg, resume) if resume else None
        if run_dir is None:
            run_dir = create_run_dir(cfg)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        else:
            check_same_config(run_dir, cfg)
    run_dir = Path(distributed.broadcast_object(str(run_dir)))
    checkpoints = run_dir / "checkpoints"

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
    adversary = objective.adversary
    if adversary is not None:
        disc_optimizer = torch.optim.Adam(
            adversary.parameters(), lr=cfg.loss.adversarial.lr, betas=cfg.loss.adversarial.betas
        )
        disc_model = DDP(adversary.discriminator) if distributed.initialized() else adversary.discriminator
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    # --- resume ----------------------------------------------------------------------------
    step, position = 0, (0, 0)
    found = checkpoint.latest_valid(checkpoints, device) if resume else None
    if found is not None:
        path, state = found
        if state["world_size"] != ctx.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} ranks; resume it with as many")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        if adversary is not None:
            adversary.load_state_dict(state["adversary"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        step, position = state["step"], tuple(state["position"])
        set_rng_state(state["rng"][ctx.rank], device)

    logger = RunLogger(cfg.tracking, run_dir, cfg.train.steps, flat_params(cfg), active=ctx.main, resume_step=step)
    logger.artifact(run_dir / "config.yaml")
    logger.advance(step)
    grid_images = torch.stack([splits.val[i] for i in range(min(cfg.eval.grid_images, len(splits.val)))]).to(device)
    # one code per token: compare with one palette colour per token-sized block
    budget = quantizer.codebook_size if quantizer.discrete else 2**24
    baseline = block_mean_baseline(val_loader, device, model.downsample, budget)
    if step == 0:
        params = sum(p.numel() for p in model.parameters())
        shape = {"model/params": params, "model/tokens": cfg.model.tokens(cfg.data.image_size)}
        logger.log({**shape, **baseline}, step=0, show=True)
        logger.log(evaluate(model, val_loader, metrics, device, cfg.train.dtype, "val"), step=0)

    def save_checkpoint(done: int, next_position: tuple[int, int]) -> None:
        rngs = distributed.all_gather_objects(rng_state(device))
        distributed.check_in_sync(model, f"step {done}")
        if adversary is not None:
            distributed.check_in_sync(adversary, f"step {done} (discriminator)")
        if not ctx.main:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": done,
            "position": list(next_position),
            "world_size": ctx.world_size,
            "rng": rngs,
            "config": to_dict(cfg),
        }
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        if adversary is not None:
            state["adversary"] = adversary.state_dict()
            state["disc_optimizer"] = disc_optimizer.state_dict()
        checkpoint.save_step(state, checkpoints, done, cfg.train.keep_checkpoints)

    # --- loop ------------------------------------------------------------------------------
    model.train()
    stream = batches(train_loader, *position)
    val_metrics: dict[str, float] = {}
    status = "FAILED"
    try:
        tick, seen = time.perf_counter(), 0
        while step < cfg.train.steps:
            quantizer.set_step(step, cfg.train.steps)
            window: dict[str, torch.Tensor] = {}
            pairs = []  # (real, reconstruction) micro-batches for the discriminator
            for micro in range(cfg.train.grad_accum):
                images, position = next(stream)
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
            if not (torch.isfinite(window["loss"]) and torch.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"non-finite loss {window['loss'].item()} or grad norm {grad_norm.item()} at step {step + 1}; "
                    f"the last good checkpoint is kept in {checkpoints}"
                )
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
            step += 1
            logger.advance()

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - tick
                logged = {f"train/{k}": v.item() for k, v in window.items()}
                logged |= {"train/lr": schedule.get_last_lr()[0], "train/grad_norm": grad_norm.item()}
                logged["train/images_per_s"] = seen * ctx.world_size / elapsed
                if device.type == "cuda":
                    logged["train/peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(logged, step=step)
                tick, seen = time.perf_counter(), 0

            # --- eval --------------------------------------------------------------------------
            if step == cfg.train.steps or (cfg.eval.every and step % cfg.eval.every == 0):
                val_metrics = evaluate(model, val_loader, metrics, device, cfg.train.dtype, "val")
                if step == cfg.train.steps:  # the final code histogram, for the analysis studies
                    for path in metrics.save(run_dir):
                        logger.artifact(path)
                if ema is not None:
                    val_metrics |= evaluate(ema.module, val_loader, metrics, device, cfg.train.dtype, "val_ema")
                logger.log(val_metrics, step=step, show=True)

            # --- checkpoint --------------------------------------------------------------------
            if step == cfg.train.steps or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
                save_checkpoint(step, position)

        if ctx.main:
            figure = run_dir / "figures" / "reconstructions.png"
            save_reconstruction_grid(model, grid_images, figure, cfg.train.dtype)
            logger.artifact(figure, "figures")
        status = "FINISHED"
    finally:
        logger.close(status)
        distributed.teardown()
    return TrainResult(run_dir=run_dir, metrics=val_metrics, baseline=baseline)


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
        help="continue a run: 'auto' = the run named by tracking.run_name if it has checkpoints "
        "(else start it), or a run folder / checkpoint file",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    print(f"run folder:   {result.run_dir}")
    if cfg.tracking.mlflow:
        print(f"mlflow store: {mlflow_uri(cfg.tracking)}")
    summary = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"final:        {summary}")
    for prefix, meaning in (("baseline/", "block mean colour"), ("baseline_palette/", "block mean, palette colour")):
        values = "  ".join(f"{k} {v:.4f}" for k, v in result.baseline.items() if k.startswith(prefix))
        print(f"{'baseline:':14s}{values}  ({meaning})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
