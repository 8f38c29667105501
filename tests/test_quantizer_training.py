"""Every registered quantizer, from its preset, trains on the photos: validation L1 falls."""

import pytest

import vqlab
from vqlab.config import read_source
from vqlab.trainer import fit

from .helpers import metric_at

NAMES = vqlab.quantizers.available()


@pytest.mark.parametrize("name", NAMES)
def test_each_quantizer_preset_learns_on_photos(name, tmp_path):
    raw = read_source("smoke")
    raw["quantizer"] = read_source(name)["quantizer"]
    cfg = vqlab.config.load(raw, {"tracking.root": str(tmp_path), "train.steps": 80})
    result = fit(cfg)
    first = metric_at(result.run_dir, "val/l1", 0)
    assert result.metrics["val/l1"] < 0.8 * first
    if vqlab.quantizers.build(cfg.quantizer).discrete:
        assert 0 < result.metrics["val/codebook_usage"] <= 1
        assert result.metrics["val/dead_codes"] >= 0
    else:
        assert "val/codebook_usage" not in result.metrics


@pytest.mark.parametrize("name", ["vq", "vq_ema"])
def test_dead_code_replacement_raises_usage(name, tmp_path):
    common = {
        "tracking.root": str(tmp_path),
        "train.steps": 80,
        "quantizer.name": name,
        "quantizer.codebook_size": 256,
        "quantizer.dim": 8,
        "quantizer.init": "normal",
        "quantizer.dead_code_steps": 0,
    }
    without = fit(vqlab.config.load("smoke", common))
    with_replacement = fit(vqlab.config.load("smoke", {**common, "quantizer.dead_code_steps": 10}))
    assert with_replacement.metrics["val/codebook_usage"] > 1.5 * without.metrics["val/codebook_usage"]
