"""Train one VQ autoencoder (`python -m vqlab.train` is its command line).

``train(cfg)`` is the whole recipe in one function with visible sections: setup, build, loop,
eval, checkpoint. Everything it writes goes to ``<tracking.root>/<experiment>/<run>/``:
``config.yaml`` (the single record of what ran), ``metrics.jsonl``, ``figures/`` and
``checkpoints/``, and the same metrics go to MLflow.
"""

from __future__ import annotations

import argparse
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
from torch.utils.data import DataLoader

from vqlab import checkpoint, data, evaluators, quantizers
from vqlab.config import RunConfig, flat_params, load, presets, to_yaml
from vqlab.losses import reconstruction_losses
from vqlab.models import VQAutoencoder, build_autoencoder
from vqlab.optim import build_optimizer, build_schedule
from vqlab.schema import ConfigError, to_dict
from vqlab.tracking import RunLogger, mlflow_uri


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]  # the final validation metrics, "val/..." keys
    baseline: dict[str, float]  # the 8x8 block-mean reference measured the same way, "baseline/..."


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


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


def batches(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Endless training batches; each epoch reshuffles with its own seed."""
    epoch = 0
    while True:
        data.set_epoch(loader, epoch)
        yield from loader
        epoch += 1


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    model: VQAutoencoder, loader: DataLoader, metrics: dict[str, evaluators.Evaluator], device: torch.device, dtype: str
) -> dict[str, float]:
    """Run ``metrics`` over the whole validation set; returns ``val/...`` keys."""
    was_training = model.training
    model.eval()
    for evaluator in metrics.values():
        evaluator.reset()
    for images in loader:
        images = images.to(device)
        with autocast(device, dtype):
            out = model(images)
        for evaluator in metrics.values():
            evaluator.update(images, out.reconstruction, out.quant.codes)
    model.train(was_training)
    return {f"val/{k}": v for evaluator in metrics.values() for k, v in evaluator.compute().items()}


@torch.no_grad()
def block_mean_baseline(loader: DataLoader, device: torch.device, block: int = 8) -> dict[str, float]:
    """The pixel metrics of replacing every ``block x block`` patch by its mean colour."""
    metric = evaluators.ReconstructionMetrics(device)
    for images in loader:
        images = images.to(device)
        metric.update(images, evaluators.block_mean(images, block))
    return {f"baseline/{k}": v for k, v in metric.compute().items()}


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


def train(cfg: RunConfig) -> TrainResult:
    # --- setup -----------------------------------------------------------------------------
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    splits = data.build_datasets(cfg.data, cfg.train.seed)
    train_loader = data.train_loader(splits.train, cfg.data, cfg.train.seed, pin_memory=device.type == "cuda")
    val_loader = data.val_loader(splits.val, cfg.data)
    run_dir = create_run_dir(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    logger = RunLogger(cfg.tracking, run_dir, cfg.train.steps, flat_params(cfg))
    logger.artifact(run_dir / "config.yaml")

    # --- build -----------------------------------------------------------------------------
    quantizer = quantizers.build(cfg.quantizer)
    model = build_autoencoder(cfg.model, quantizer).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    schedule = build_schedule(optimizer, cfg.optim, cfg.train.steps)
    metrics = evaluators.build(cfg.eval.metrics, quantizer.radices, device)
    grid_images = torch.stack([splits.val[i] for i in range(min(cfg.eval.grid_images, len(splits.val)))]).to(device)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    baseline = block_mean_baseline(val_loader, device)
    logger.log({"model/params": sum(p.numel() for p in model.parameters()), **baseline}, step=0, show=True)
    logger.log(evaluate(model, val_loader, metrics, device, cfg.train.dtype), step=0)

    def save_checkpoint(step: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "config": to_dict(cfg),
        }
        checkpoint.save_atomic(state, run_dir / "checkpoints" / "last.pt")

    # --- loop ------------------------------------------------------------------------------
    model.train()
    stream = batches(train_loader)
    val_metrics: dict[str, float] = {}
    status = "FAILED"
    try:
        tick, seen = time.perf_counter(), 0
        for step in range(cfg.train.steps):
            images = next(stream).to(device, non_blocking=True)
            quantizer.set_step(step, cfg.train.steps)
            with autocast(device, cfg.train.dtype):
                out = model(images)
            losses = {**reconstruction_losses(out.reconstruction, images, cfg.loss), **out.quant.losses}
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"non-finite loss {loss.item()} or grad norm {grad_norm.item()} at step {step + 1}; "
                    f"the last good checkpoint is kept in {run_dir / 'checkpoints'}"
                )
            optimizer.step()
            quantizer.on_optimizer_step()
            schedule.step()
            logger.advance()
            seen += len(images)
            done = step + 1

            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                elapsed = time.perf_counter() - tick
                logged = {"train/loss": loss.item(), "train/lr": schedule.get_last_lr()[0]}
                logged |= {f"train/{k}": v.item() for k, v in {**losses, **out.quant.stats}.items()}
                logged |= {"train/grad_norm": grad_norm.item(), "train/images_per_s": seen / elapsed}
                logger.log(logged, step=done)
                tick, seen = time.perf_counter(), 0

            # --- eval --------------------------------------------------------------------------
            if done == cfg.train.steps or (cfg.eval.every and done % cfg.eval.every == 0):
                val_metrics = evaluate(model, val_loader, metrics, device, cfg.train.dtype)
                logger.log(val_metrics, step=done, show=True)

            # --- checkpoint --------------------------------------------------------------------
            if done == cfg.train.steps or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
                save_checkpoint(done)

        figure = run_dir / "figures" / "reconstructions.png"
        save_reconstruction_grid(model, grid_images, figure, cfg.train.dtype)
        logger.artifact(figure, "figures")
        status = "FINISHED"
    finally:
        logger.close(status)
    return TrainResult(run_dir=run_dir, metrics=val_metrics, baseline=baseline)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vqlab.train",
        description="Train a VQ image tokenizer. Overrides are dotted key=value pairs, e.g. "
        "quantizer.levels=[8,5,5,5] train.steps=200 optim.lr=3e-4",
    )
    parser.add_argument("--config", default="default", help=f"a preset ({', '.join(presets())}) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = train(cfg)
    print(f"run folder:   {result.run_dir}")
    if cfg.tracking.mlflow:
        print(f"mlflow store: {mlflow_uri(cfg.tracking)}")
    summary = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"final:        {summary}")
    print("baseline:     " + "  ".join(f"{k} {v:.4f}" for k, v in result.baseline.items()) + "  (8x8 block mean)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
