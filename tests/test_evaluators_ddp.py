"""Evaluators and ``vqlab.evaluate`` under 2 (and evaluators under 3) gloo processes: the global metrics equal one
process's on the same data (and differ from the average of per-rank values, the upstream
mistake). The workers join through the environment variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as ``vqlab.distributed.setup`` expects under torchrun."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import vqlab
from vqlab import distributed
from vqlab.evaluate import evaluate_run
from vqlab.evaluators import CodebookMetrics, FidelityMetrics, ReconstructionMetrics, SlicedWasserstein
from vqlab.runfolder import RunFolder
from vqlab.trainer import fit

from .helpers import free_port, model_output, spawn_ranks

CPU = torch.device("cpu")
COUNT = 10
RADICES = (2, 4)
WIDE = RADICES + (1024,) * 7  # 2^73 codes: histograms keyed by digits, not an int64 index
SWD_IMAGES = 7  # fewer than the set, and divisible by neither 2 nor 3 ranks


class TinyExtractor(torch.nn.Module):
    """A deterministic stand-in for Inception: 2x2 average colours as "pool features" and a fixed
    projection of them as "logits"."""

    def __init__(self):
        super().__init__()
        self.projection = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)
        return pool, 5 * pool @ self.projection


def dataset():
    """Images, reconstructions and codes; even samples use codes {0, 1}, odd samples {4, 5}, so a
    2-rank interleaved split gives each rank half of the codes used."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(COUNT, 3, 4, 4, generator=generator) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)
    reconstructions = (images + 0.2 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    flat = torch.tensor([[(i % 2) * 4 + t % 2 for t in range(6)] for i in range(COUNT)])
    codes = torch.stack([flat % 2, flat // 2], dim=-1)  # (COUNT, 6 tokens, 2 digits)
    return images, reconstructions, codes


def evaluate(indices: list[int], batch: int = 3, save_to: Path | None = None) -> dict[str, float]:
    """Every evaluator over the samples ``indices``, keys prefixed by family; the wide codebook
    sees the same codes with seven zero digits appended. With ``save_to``, the pixel metrics'
    files (the per-image L1) are written there."""
    images, reconstructions, codes = dataset()
    wide = torch.cat([codes, torch.zeros(*codes.shape[:2], len(WIDE) - len(RADICES), dtype=torch.int64)], -1)
    evaluators = {  # prefix: (evaluator, the codes it is fed)
        "": (ReconstructionMetrics(CPU), codes),
        "codebook/": (CodebookMetrics(RADICES, CPU), codes),
        "wide/": (CodebookMetrics(WIDE, CPU), wide),
        "fid/": (FidelityMetrics(TinyExtractor(), CPU, kid_subset_size=4, kid_subsets=5), codes),
        "swd/": (SlicedWasserstein(CPU, max_images=SWD_IMAGES, per_image=16), codes),
    }
    for start in range(0, len(indices), batch):
        chunk = indices[start : start + batch]
        for evaluator, fed in evaluators.values():
            evaluator.update(images[chunk], model_output(reconstructions[chunk], fed[chunk]))
    if save_to is not None:
        evaluators[""][0].save(save_to)
    return {prefix + k: v for prefix, (evaluator, _) in evaluators.items() for k, v in evaluator.compute().items()}


def worker(rank, world, folder, port, run_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    distributed.setup("cpu")
    shard = list(range(rank, COUNT, world))  # ShardSampler's split
    torch.save(evaluate(shard, save_to=folder / f"saved{world}"), folder / f"rank{rank}of{world}.pt")
    if run_dir is not None:
        evaluate_run(run_dir, out=folder / "two.json")  # leaves the process group at its end


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A 2-step smoke run, then both ranks' evaluator results and the run's 2-rank eval.json."""
    folder = tmp_path_factory.mktemp("ddp")
    overrides = {
        "tracking.root": str(folder / "runs"),
        "train.steps": 2,
        "optim.warmup_steps": 0,
        "eval.metrics": ["reconstruction", "codebook", "swd"],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = fit(vqlab.config.load("smoke", overrides)).run_dir
        for world, evaluated_run in ((2, run_dir), (3, None)):
            spawn_ranks(worker, (world, folder, free_port(), evaluated_run), world)
        single = evaluate_run(run_dir, out=folder / "one.json")
        evaluated = {n: json.loads((folder / f"{n}.json").read_text()) for n in ("one", "two")}
        local = {
            "single": evaluate(list(range(COUNT)), save_to=folder / "saved1"),
            "shards": [evaluate(list(range(rank, COUNT, 2))) for rank in range(2)],
        }
    finally:
        torch.set_num_threads(threads)
    ranks = {world: [torch.load(folder / f"rank{rank}of{world}.pt") for rank in range(world)] for world in (2, 3)}
    per_image = {world: np.load(RunFolder(folder / f"saved{world}").per_image_l1()) for world in (1, 2, 3)}
    return {"ranks": ranks, "evaluated": evaluated, "single_run": single, "per_image": per_image, **local}


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_single_process_metrics(results, world):
    single = results["single"]
    assert single["codebook/codebook_usage"] == 4 / 8 and single["wide/codebook_usage"] == 4 / 2**73
    # the bootstrap over crops resamples them in dataset order, whichever rank held each
    assert {"codebook/measured_bits_low", "wide/measured_bits_high"} <= single.keys()
    for rank in range(world):
        assert results["ranks"][world][rank].keys() == single.keys()
        assert results["ranks"][world][rank] == pytest.approx(single, rel=1e-6, abs=1e-9)


def test_the_per_image_l1_is_gathered_in_dataset_order(results):
    images, reconstructions, _ = dataset()
    by_hand = (images.clamp(-1, 1) - reconstructions.clamp(-1, 1)).abs().div(2).flatten(1).double().mean(1)
    for world in (1, 2, 3):
        assert results["per_image"][world] == pytest.approx(by_hand.numpy(), rel=1e-6), world
        assert results["per_image"][world].mean() == pytest.approx(results["single"]["l1"], rel=1e-12), world


def test_the_per_rank_average_would_be_wrong(results):
    single, shards = results["single"], results["shards"]
    average = {k: (shards[0][k] + shards[1][k]) / 2 for k in single}
    assert average["codebook/codebook_usage"] == 2 / 8 and average["wide/codebook_usage"] == 2 / 2**73
    assert average["codebook/perplexity"] != pytest.approx(single["codebook/perplexity"])
    assert average["fid/fid"] != pytest.approx(single["fid/fid"], rel=1e-3)
    assert average["fid/kid"] != pytest.approx(single["fid/kid"], rel=1e-3)


def test_evaluate_under_two_ranks_gives_the_single_process_numbers(results):
    one, two = results["evaluated"]["one"], results["evaluated"]["two"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert {"eval/l1", "eval/ssim", "eval/swd", "eval/codebook_usage"} <= set(two["metrics"])
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-6)
