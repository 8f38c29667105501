"""The k-means palette codec: fitted on training crops only, deterministic for a seed, and stronger
than the uniform RGB palette at the same small budget on the photos."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import vqlab
from vqlab import data
from vqlab.evaluators import baselines, block_mean_baseline, kmeans_palette

CPU = torch.device("cpu")


class Flat(Dataset):
    """16x16 crops, each one flat colour of ``colours`` in turn; records which indices were read."""

    def __init__(self, colours: list[tuple[float, float, float]], count: int):
        self.colours, self.count, self.read = colours, count, []

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        self.read.append(index)
        return torch.tensor(self.colours[index % len(self.colours)]).view(3, 1, 1).expand(3, 16, 16).clone()


@pytest.fixture(scope="module")
def photos():
    cfg = vqlab.config.load("smoke", {})
    splits = data.build_datasets(cfg.data, cfg.train.seed)
    return splits, data.val_loader(splits.val, cfg.data)


# From 1000 colours on, these validation photos' block colours fall outside the training photos'
# gamut often enough that the uniform cube catches up (L1 0.0535 against 0.0534 at 1000 colours
# on the default preset's crops); on held-out training crops k-means stays ~8x lower in MSE.
@pytest.mark.parametrize("colours", [64, 512])
def test_the_kmeans_palette_beats_the_uniform_palette_on_photos_at_the_same_budget(photos, colours):
    splits, val = photos
    palette = kmeans_palette(splits.train, 8, colours, seed=0)
    metrics = block_mean_baseline(val, CPU, 8, colours, palette)
    assert metrics["baseline_kmeans/colors"] == metrics["baseline_palette/colors"] == colours
    for name in ("l1", "mse"):
        assert metrics[f"baseline_kmeans/{name}"] <= metrics[f"baseline_palette/{name}"], name
    assert metrics["baseline_kmeans/l1"] >= metrics["baseline/l1"]  # no palette beats the exact block mean


def test_the_palette_is_the_training_colours_and_draws_from_no_global_generator():
    train_colours = [(-0.8, -0.2, 0.4), (0.6, 0.1, -0.5), (0.0, 0.9, 0.3)]
    train = Flat(train_colours, count=40)
    before = torch.get_rng_state(), np.random.get_state(), random.getstate()
    palette = kmeans_palette(train, 8, codebook_size=64, seed=0)
    after = torch.get_rng_state(), np.random.get_state(), random.getstate()
    assert torch.equal(before[0], after[0]) and str(before[1]) == str(after[1]) and before[2] == after[2]
    # fewer distinct colours than the budget: exactly those, nothing seen elsewhere
    assert torch.allclose(torch.tensor(sorted(palette.tolist())), torch.tensor(sorted(train_colours)))

    val = DataLoader(Flat([(0.9, 0.9, 0.9)], count=4), batch_size=2)
    metrics = block_mean_baseline(val, CPU, 8, 64, palette)
    assert metrics["baseline_kmeans/colors"] == 3
    nearest = min(train_colours, key=lambda c: sum((x - 0.9) ** 2 for x in c))
    assert metrics["baseline_kmeans/l1"] == pytest.approx(sum(abs(x - 0.9) for x in nearest) / 3 / 2)  # [0, 1] scale


def test_the_trainer_fits_the_palette_on_the_training_split_once_per_data_and_seed(smoke_cfg, monkeypatch):
    seen = []

    def spy(train, *args):
        seen.append(train)
        return kmeans_palette(train, *args)

    monkeypatch.setattr(baselines, "kmeans_palette", spy)
    monkeypatch.setattr(baselines, "_fitted_palettes", {})
    short = {"train.steps": 1, "optim.warmup_steps": 0}
    result = vqlab.fit(smoke_cfg(**short))
    (train,) = seen
    assert type(train) is data.PhotoCrops  # validation crops are GridCrops, of other photos
    assert len(train.photos) == len(data.TRAIN_PHOTOS) and len(train) == 2000
    assert result.baseline["baseline_kmeans/colors"] == 1000
    # another model on the same crops reuses the palette, bit for bit; other crops get their own
    again = vqlab.fit(smoke_cfg(**short, **{"quantizer.levels": [8, 5, 5, 5], "model.width": 16}))
    assert len(seen) == 1 and again.baseline == result.baseline
    vqlab.fit(smoke_cfg(**short, **{"train.seed": 1}))
    vqlab.fit(smoke_cfg(**short, **{"data.train_count": 1000}))
    assert len(seen) == 3


def test_a_reused_palette_is_a_copy(photos):
    splits, _ = photos
    cfg = vqlab.config.load("smoke", {})
    first = baselines.training_palette(cfg.data, 0, splits.train, 8, 64)
    expected = first.clone()
    first.zero_()
    assert torch.equal(baselines.training_palette(cfg.data, 0, splits.train, 8, 64), expected)


def test_the_palette_is_deterministic_for_a_seed(photos):
    splits, _ = photos
    first, again = (kmeans_palette(splits.train, 8, 64, seed=3) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, kmeans_palette(splits.train, 8, 64, seed=4))


def test_the_palette_is_fitted_on_enough_blocks_and_capped(monkeypatch):
    train = Flat([(i / 100, -i / 100, 0.0) for i in range(100)], count=100)  # 4 blocks of 8x8 per crop
    kmeans_palette(train, 8, codebook_size=10, seed=0)
    assert len(set(train.read)) == 10 * baselines.BLOCKS_PER_COLOUR // 4
    monkeypatch.setattr(baselines, "KMEANS_MAX_COLOURS", 16)
    assert kmeans_palette(train, 8, codebook_size=2**24, seed=0).shape == (16, 3)
