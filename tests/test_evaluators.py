"""Each evaluator against a reference computed independently on small inputs; the LPIPS and
Inception code paths with stand-in weights under a temporary TORCH_HOME; missing weights."""

import dataclasses
import hashlib
import itertools
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from vqlab import evaluators, weights
from vqlab.evalconfig import EVALUATORS, EvalConfig
from vqlab.evaluators import CodebookMetrics, CodeHistogram, ReconstructionMetrics, SlicedWasserstein, fidelity
from vqlab.evaluators import swd as swd_lib
from vqlab.evaluators.codebook import measured_rate
from vqlab.runfolder import RunFolder

from .helpers import model_output

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are small and the CPU is shared: a second OpenMP thread mostly waits (on a
    loaded 2-core machine a stand-in Inception pass takes 6 s with two threads, 0.15 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit_to_model(x: torch.Tensor) -> torch.Tensor:
    return x * 2 - 1


# --- reconstruction ------------------------------------------------------------------------------


def test_l1_mse_psnr_by_hand():
    x = torch.zeros(3, 3, 4, 4)  # [0, 1] space
    y = x.clone()
    y[0] += 0.1  # every pixel off by 0.1
    y[1, :, :2] += 0.5  # half the pixels off by 0.5
    metrics = ReconstructionMetrics(CPU)
    metrics.update_pairs(unit_to_model(x[:2]), unit_to_model(y[:2]))
    metrics.update_pairs(unit_to_model(x[2:]), unit_to_model(y[2:]))  # image 2 is exact
    out = metrics.compute()
    assert out["l1"] == pytest.approx((0.1 + 0.25 + 0) / 3)
    assert out["mse"] == pytest.approx((0.01 + 0.125 + 0) / 3)
    assert out["psnr"] == pytest.approx((10 * math.log10(1 / 0.01) + 10 * math.log10(1 / 0.125) + 100) / 3)
    assert "ssim" not in out  # 4 px images are smaller than the 11 px SSIM window


def test_per_image_l1_is_saved_in_dataset_order_and_its_mean_is_l1(tmp_path):
    x = torch.zeros(3, 3, 4, 4)  # [0, 1] space
    y = x.clone()
    y[0] += 0.1  # every pixel off by 0.1
    y[1, :, :2] += 0.5  # half the pixels off by 0.5; image 2 is exact
    metrics = ReconstructionMetrics(CPU)
    metrics.update_pairs(unit_to_model(x[:2]), unit_to_model(y[:2]))
    metrics.update_pairs(unit_to_model(x[2:]), unit_to_model(y[2:]))
    (path,) = metrics.save(tmp_path, prefix="ema_")
    assert path == RunFolder(tmp_path).per_image_l1("ema_") and path.name == "ema_per_image_l1.npy"
    saved = np.load(path)
    assert saved.dtype == np.float64 and saved == pytest.approx([0.1, 0.25, 0.0], abs=1e-7)
    assert saved.mean() == pytest.approx(metrics.compute()["l1"], rel=1e-12)
    metrics.reset()
    metrics.update_pairs(unit_to_model(x[2:]), unit_to_model(y[2:]))
    assert np.load(metrics.save(tmp_path)[0]).tolist() == [0.0]  # a new evaluation starts afresh


def test_reconstructions_are_clamped_before_measuring():
    metrics = ReconstructionMetrics(CPU)
    metrics.update_pairs(torch.ones(1, 3, 4, 4), torch.full((1, 3, 4, 4), 3.0))
    assert metrics.compute()["l1"] == 0


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    torch.manual_seed(0)
    x = torch.rand(3, 3, 20, 16)
    y = (x + 0.15 * torch.randn_like(x)).clamp(0, 1)
    metrics = ReconstructionMetrics(CPU)
    metrics.update_pairs(unit_to_model(x), unit_to_model(y))
    expected = np.mean(
        [
            structural_similarity(
                a.permute(1, 2, 0).double().numpy(),
                b.permute(1, 2, 0).double().numpy(),
                channel_axis=2,
                data_range=1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for a, b in zip(to_unit_again(x), to_unit_again(y), strict=True)
        ]
    )
    assert metrics.compute()["ssim"] == pytest.approx(expected, abs=1e-9)


def to_unit_again(x: torch.Tensor) -> torch.Tensor:
    """The [0, 1] images the evaluator sees after its round trip through [-1, 1]."""
    return evaluators.to_unit(unit_to_model(x))


# --- codebook ------------------------------------------------------------------------------------


def known_codes():
    """Radices (2, 4): flat index = d0 + 2 d1. Histogram {0: 4, 1: 2, 5: 1, 7: 1} over 8 codes."""
    flat = torch.tensor([0, 0, 0, 0, 1, 1, 5, 7])
    return torch.stack([flat % 2, flat // 2], dim=-1).reshape(2, 4, 2)  # (B, N, G)


@pytest.mark.parametrize("dense_limit", [2**18, 1])  # dense vector, then the sparse table
def test_usage_perplexity_dead_codes_on_a_known_histogram(dense_limit):
    metrics = CodebookMetrics((2, 4), CPU, dense_limit=dense_limit)
    assert metrics.dense == (dense_limit > 8)
    codes = known_codes()
    metrics.update(None, model_output(codes=codes[:1]))
    metrics.update(None, model_output(codes=codes[1:]))
    out = metrics.compute()
    p = np.array([4, 2, 1, 1]) / 8
    assert out["codebook_usage"] == 4 / 8
    assert out["dead_codes"] == 4
    assert out["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # digit 0 (radix 2): values 0,0,0,0,1,1,1,1; digit 1 (radix 4): 0,0,0,0,0,0,2,3
    assert out["usage_digit0"] == 1 and out["perplexity_digit0"] == pytest.approx(2)
    q = np.array([6, 1, 1]) / 8
    assert out["usage_digit1"] == 3 / 4 and out["dead_codes_digit1"] == 1
    assert out["perplexity_digit1"] == pytest.approx(math.exp(-(q * np.log(q)).sum()))
    digits, counts = metrics.histogram()
    assert digits.tolist() == [[0, 0], [1, 0], [1, 2], [1, 3]] and counts.tolist() == [4, 2, 1, 1]


def test_large_codebooks_are_counted_sparsely():
    radices = (2,) * 24  # 16.7M codes: no dense histogram
    metrics = CodebookMetrics(radices, CPU)
    assert not metrics.dense
    digits = torch.zeros(3, 5, 24, dtype=torch.int64)
    digits[1, :, 0] = 1  # codes 0 (10 times) and 1 (5 times)
    metrics.update(None, model_output(codes=digits))
    out = metrics.compute()
    assert out["codebook_usage"] == 2 / 2**24 and out["dead_codes"] == 2**24 - 2
    assert out["perplexity"] == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))


def test_histogram_artifact(tmp_path):
    metrics = CodebookMetrics((2, 4), CPU)
    metrics.update(None, model_output(codes=known_codes()))
    (path,) = metrics.save(tmp_path, prefix="eval_")
    assert path == tmp_path / "eval_codebook_histogram.npz"
    with np.load(path) as saved:
        assert saved["indices"].tolist() == [0, 1, 5, 7] and saved["counts"].tolist() == [4, 2, 1, 1]
        assert saved["digits"].tolist() == [[0, 0], [1, 0], [1, 2], [1, 3]]
        assert saved["radices"].tolist() == [2, 4] and int(saved["codebook_size"]) == 8
        assert saved["digit_counts_1"].tolist() == [6, 0, 1, 1] and not saved["sparse"]


def test_a_histogram_of_more_than_ten_digits_reads_back_in_digit_order(tmp_path):
    radices = tuple(range(2, 13))  # 11 digits: "digit_counts_10" sorts before "digit_counts_2" as text
    digits = torch.stack([torch.arange(5) % r for r in radices], dim=-1)  # 5 codes, ascending flat index
    metrics = CodebookMetrics(radices, CPU)
    metrics.update(None, model_output(codes=digits[None]))
    (path,) = metrics.save(tmp_path)
    read = CodeHistogram.read(path)
    assert read.radices == radices and read.codebook_size == math.prod(radices) and read.sparse
    assert read.digits.tolist() == digits.tolist() and read.counts.tolist() == [1] * 5
    assert [len(counts) for counts in read.digit_counts] == list(radices)
    for i, counts in enumerate(read.digit_counts):
        assert counts.tolist() == torch.bincount(digits[:, i], minlength=radices[i]).tolist()
    read.write(tmp_path / "again.npz")
    again = CodeHistogram.read(tmp_path / "again.npz")
    assert again.radices == read.radices and [c.tolist() for c in again.digit_counts] == [
        c.tolist() for c in read.digit_counts
    ]


WIDE = (1024,) * 7  # 2^70 codes: no int64 flat index exists


def wide_codes() -> torch.Tensor:
    """Over ``WIDE``: 3 x zero, 2 x (5, 0.., 1), 1 x (0, 0.., 1), 1 x (7, 0..): flat order 0, 7,
    1024^6, 1024^6 + 5, which lexicographic order from digit 0 would not give."""
    rows = torch.zeros(7, 7, dtype=torch.int64)
    rows[3:5, 0], rows[3:6, 6], rows[6, 0] = 5, 1, 7
    return rows.reshape(1, 7, 7)  # (B, N, G)


def test_codebooks_beyond_int64_are_counted_by_digits(tmp_path):
    metrics = CodebookMetrics(WIDE, CPU)
    metrics.update(None, model_output(codes=wide_codes()[:, :4]))
    metrics.update(None, model_output(codes=wide_codes()[:, 4:]))
    out = metrics.compute()
    p = np.array([3, 2, 1, 1]) / 7
    assert out["codebook_usage"] == 4 / 2**70 and out["dead_codes"] == float(2**70 - 4)
    assert out["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert out["usage_digit0"] == 3 / 1024 and out["usage_digit6"] == 2 / 1024
    digits, counts = metrics.histogram()
    assert digits[:, [0, 6]].tolist() == [[0, 0], [7, 0], [0, 1], [5, 1]] and counts.tolist() == [3, 1, 1, 2]
    (path,) = metrics.save(tmp_path)
    with np.load(path) as saved:
        assert "indices" not in saved and "codebook_size" not in saved and bool(saved["sparse"])
        assert saved["digits"].tolist() == digits.tolist() and saved["counts"].tolist() == [3, 1, 1, 2]
        assert saved["radices"].tolist() == list(WIDE)


def test_reset_starts_a_new_evaluation():
    metrics = CodebookMetrics((2, 4), CPU)
    metrics.update(None, model_output(codes=known_codes()))
    metrics.reset()
    metrics.update(None, model_output(codes=torch.zeros(1, 3, 2, dtype=torch.int64)))
    assert metrics.compute()["codebook_usage"] == 1 / 8


def miller_madow_by_hand(counts) -> float:
    """Plug-in entropy in bits plus (m - 1) / (2 N ln 2), written out with numpy alone."""
    counts = np.asarray([c for c in counts if c > 0], dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() + (len(counts) - 1) / (2 * counts.sum() * math.log(2)))


@pytest.mark.parametrize("dense_limit", [2**18, 1])
def test_measured_bits_is_the_miller_madow_entropy_of_every_token(dense_limit):
    metrics = CodebookMetrics((2, 4), CPU, dense_limit=dense_limit)
    codes = known_codes()  # 2 crops of 4 tokens: {0: 4}, then {1: 2, 5: 1, 7: 1}
    metrics.update(None, model_output(codes=codes[:1]))
    metrics.update(None, model_output(codes=codes[1:]))
    out = metrics.compute()
    assert out["measured_bits"] == pytest.approx(miller_madow_by_hand([4, 2, 1, 1]), rel=1e-12)
    assert out["measured_bits"] == pytest.approx(1.75 + 3 / (16 * math.log(2)), rel=1e-12)
    # resampling 2 crops: both the first (0 bits), both the second, or one of each (the estimate)
    assert out["measured_bits_low"] <= out["measured_bits"] <= out["measured_bits_high"]


def test_measured_bits_of_codes_beyond_int64_count_digit_rows():
    metrics = CodebookMetrics(WIDE, CPU)
    metrics.update(None, model_output(codes=wide_codes()))
    assert metrics.compute()["measured_bits"] == pytest.approx(miller_madow_by_hand([3, 2, 1, 1]), rel=1e-12)


def test_one_crop_has_a_measured_rate_but_no_interval():
    metrics = CodebookMetrics((2, 4), CPU)
    metrics.update(None, model_output(codes=known_codes()[:1]))
    out = metrics.compute()
    assert out["measured_bits"] == 0 and "measured_bits_low" not in out and "measured_bits_high" not in out


def zipf_crops(crops: int, tokens: int = 16, codes: int = 2**14, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(crop of each token, code of each token)``: codes drawn from a Zipf law over ``codes``."""
    p = 1 / np.arange(1, codes + 1)
    drawn = np.random.default_rng(seed).choice(codes, size=crops * tokens, p=p / p.sum())
    return np.repeat(np.arange(crops), tokens), drawn


def test_the_rate_interval_holds_the_estimate_and_narrows_with_more_crops():
    few, many = measured_rate(*zipf_crops(64)), measured_rate(*zipf_crops(1024))
    for estimate, low, high in (few, many):
        assert low < estimate < high
    assert many[2] - many[1] < 0.5 * (few[2] - few[1])  # 16 times the crops: about a quarter of the width


def test_the_rate_is_deterministic_and_does_not_depend_on_the_order_of_tokens():
    crops, codes = zipf_crops(256)
    order = np.random.default_rng(1).permutation(len(codes))
    assert measured_rate(crops, codes) == measured_rate(crops, codes) == measured_rate(crops[order], codes[order])
    # the same codes under other integers (or digit rows) measure the same, up to the order of the sums
    relabelled = measured_rate(crops * 3 + 7, np.stack([codes % 7, codes // 7], -1))
    assert relabelled == pytest.approx(measured_rate(crops, codes), rel=1e-12)


# --- sliced Wasserstein distance -----------------------------------------------------------------


def test_pyr_down_matches_scipy_mirror_convolution():
    from scipy import ndimage

    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 255
    kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256
    expected = ndimage.convolve(images.double().numpy(), kernel[None, None], mode="mirror")[:, :, ::2, ::2]
    assert np.allclose(swd_lib.pyr_down(images).numpy(), expected, atol=1e-3)


def test_laplacian_pyramid_reconstructs_the_image():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32) * 255
    pyramid = swd_lib.laplacian_pyramid(images, 3)
    assert [level.shape[-1] for level in pyramid] == [32, 16, 8]
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = band + swd_lib.pyr_up(image, band.shape[-2:])
    assert torch.allclose(image, images, atol=1e-3)
    assert swd_lib.resolutions(32) == [32, 16] and swd_lib.resolutions(128) == [128, 64, 32, 16]
    assert swd_lib.resolutions(8) == [8]


def test_sliced_wasserstein_of_a_known_shift():
    """Shifting a set by t moves every projection on direction u by <t, u>: the distance is the
    mean of |<t, u>| over the directions, and linear in |t|."""
    torch.manual_seed(0)
    points = torch.randn(500, 5, dtype=torch.float64)
    directions = swd_lib.random_directions(5, 64, torch.Generator().manual_seed(0))
    t = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    for scale in (0.5, 1.0, 2.0):
        expected = (scale * t @ directions).abs().mean().item()
        assert swd_lib.sliced_wasserstein(points, points + scale * t, directions) == pytest.approx(expected)
    assert swd_lib.sliced_wasserstein(points, points[torch.randperm(500)], directions) == pytest.approx(0, abs=1e-12)


def smooth_images(count: int, size: int = 32) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1] (upsampled noise), like low-frequency photo content."""
    torch.manual_seed(1)
    coarse = torch.rand(count, 3, size // 4, size // 4) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def swd_of(images: torch.Tensor, reconstructions: torch.Tensor, batch: int = 8) -> dict[str, float]:
    metric = SlicedWasserstein(CPU, per_image=32)
    for start in range(0, len(images), batch):
        metric.update_pairs(images[start : start + batch], reconstructions[start : start + batch])
    return metric.compute()


def test_swd_is_zero_on_identical_sets_and_grows_with_noise():
    images = smooth_images(16)
    same = swd_of(images, images.clone())
    assert set(same) == {"swd_32", "swd_16", "swd"}
    assert all(v == pytest.approx(0, abs=1e-6) for v in same.values())
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    values = [swd_of(images, (images + sigma * noise).clamp(-1, 1)) for sigma in (0.03, 0.1, 0.3)]
    for key in ("swd_32", "swd_16", "swd"):
        series = [v[key] for v in values]
        assert all(a < b for a, b in itertools.pairwise(series)), (key, series)
    assert values[0]["swd"] > 1.0  # well above the identical-set value


def test_swd_does_not_depend_on_batching_or_touch_the_global_rng():
    images = smooth_images(12)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    one = swd_of(images, noisy, batch=12)
    assert torch.equal(torch.get_rng_state(), state)
    assert swd_of(images, noisy, batch=5) == pytest.approx(one, rel=1e-5)


# --- Fréchet distance ----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [10, 50])  # fewer samples than dimensions (feature factor), then more
def test_frechet_distance_matches_torch_fidelity(count):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    torch.manual_seed(0)
    a = torch.randn(count, 16, dtype=torch.float64)
    b = torch.randn(count + 3, 16, dtype=torch.float64) * 1.5 + 0.3
    expected = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
    ours = fidelity.frechet_distance(a.mean(0), fidelity.feature_factor(a), b.mean(0), fidelity.feature_factor(b))
    assert ours == pytest.approx(expected[KEY_METRIC_FID], rel=1e-8)
    _, sigma = fidelity.statistics(a)
    from_stats = fidelity.frechet_distance(
        a.mean(0), fidelity.covariance_factor(sigma), b.mean(0), fidelity.feature_factor(b)
    )
    assert from_stats == pytest.approx(expected[KEY_METRIC_FID], rel=1e-8)
    assert fidelity.frechet_distance(a.mean(0), fidelity.feature_factor(a), a.mean(0), fidelity.feature_factor(a)) == (
        pytest.approx(0, abs=1e-9)
    )


# --- the validation loop ---------------------------------------------------------------------------


def test_the_validation_loop_hands_evaluators_the_whole_model_output(smoke_cfg):
    from vqlab import quantizers
    from vqlab.models import build_autoencoder

    cfg = smoke_cfg()
    quantizer = quantizers.build(cfg.quantizer)
    model = build_autoencoder(cfg.model, quantizer)

    class Recorder(evaluators.Evaluator):
        def reset(self):
            self.seen = []

        def update(self, images, out):
            self.seen.append((images, out))

        def compute(self):
            return {"batches": float(len(self.seen))}

    recorder = Recorder()
    images = smooth_images(6)
    assert evaluators.measure(model, [images[:4], images[4:]], recorder, CPU, cfg.train.dtype, "val") == {
        "val/batches": 2.0
    }
    for batch, out in recorder.seen:
        tokens, _ = model.tokens(batch)
        assert out.latents.shape == (len(batch), tokens.shape[1], quantizer.dim)
        assert torch.equal(out.latents, tokens)  # what the quantizer was fed, before quantization
        assert torch.equal(out.quant.codes, quantizer.encode(out.latents))
        assert out.reconstruction.shape == batch.shape


# --- weights: stand-ins, missing files -----------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def hub_file(torch_home, name):
    path = torch_home / "hub" / "checkpoints" / weights.REGISTRY[name].filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


SMALL_INCEPTION_INPUT = 75  # the smallest input Inception takes; 299 costs seconds per image on a CPU


def write_stand_in_inception(path, seed: int = 0):
    return weights.write_stand_in("inception", path, seed)


@pytest.fixture
def inception_file(torch_home, monkeypatch):
    """Stand-in Inception weights under torch hub's file name, on small inputs."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", SMALL_INCEPTION_INPUT)
    return write_stand_in_inception(hub_file(torch_home, "inception"))


def counting_extractor(suite) -> list[int]:
    """The batch sizes the suite's Inception is run on, appended as it runs."""
    fid = suite.evaluators["fid"]
    extractor, calls = fid.extractor, []
    fid.extractor = lambda x: calls.append(len(x)) or extractor(x)
    return calls


def test_fid_isc_kid_with_stand_in_inception(inception_file, tmp_path):
    options = EvalConfig(metrics=("fid",), reference_cache=str(tmp_path / "fid_cache"))
    suite = evaluators.build(("fid",), (8, 5), CPU, options)
    images = smooth_images(6)
    blurred = torch.nn.functional.avg_pool2d(images, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)

    calls = counting_extractor(suite)
    suite.update(images, model_output(images.clone()))
    same = suite.compute()
    assert calls == [6, 6]  # originals, reconstructions
    assert set(same) == {"fid", "isc", "isc_std", "kid", "kid_std"}
    assert same["fid"] == pytest.approx(0, abs=1e-6)
    assert same["isc"] >= 1 - 1e-9  # exp of a mean KL divergence

    suite.reset()
    suite.update(images[:4], model_output(blurred[:4]))
    suite.update(images[4:], model_output(blurred[4:]))
    different = suite.compute()
    assert calls == [6, 6, 4, 2]  # the originals' features were remembered
    assert different["fid"] > 1e-4 and different["kid"] > same["kid"]


def test_the_reference_cache_skips_the_originals_and_follows_the_weights(inception_file, tmp_path):
    """A later process with the same Inception weights runs it on the reconstructions only and
    gets the same numbers; other weights never reuse the first weights' features."""
    images = smooth_images(6)
    blurred = torch.nn.functional.avg_pool2d(images, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)

    def fid_of(weights_file, reconstructions, expected_calls):
        options = EvalConfig(
            metrics=("fid",), reference_cache=str(tmp_path / "cache"), inception_weights=str(weights_file)
        )
        suite = evaluators.build(("fid",), (8, 5), CPU, options)  # a fresh evaluator, as in a new process
        calls = counting_extractor(suite)
        suite.update(images, model_output(reconstructions))
        metrics = suite.compute()
        assert calls == expected_calls
        return metrics

    cold = fid_of(inception_file, blurred, [6, 6])
    (cached,) = (tmp_path / "cache").glob("*.npz")
    assert re.fullmatch(r"inception-v3-compat-[0-9a-f]{16}\.npz", cached.name)
    assert fid_of(inception_file, blurred, [6]) == pytest.approx(cold, rel=1e-9)  # a hit: reconstructions only
    other = write_stand_in_inception(tmp_path / "other-inception.pth", seed=1)
    assert fid_of(other, images.clone(), [6, 6])["fid"] == pytest.approx(0, abs=1e-6)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_lpips_with_stand_in_trunks(torch_home):
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), hub_file(torch_home, "alexnet"))
    torch.save(torchvision.models.squeezenet1_1().state_dict(), hub_file(torch_home, "squeezenet1_1"))
    images = smooth_images(4)
    for net, key in (("alex", "lpips"), ("squeeze", "lpips_squeeze")):
        suite = evaluators.build(("lpips",), (8, 5), CPU, EvalConfig(lpips_net=net))
        suite.update(images, model_output(images.clone()))
        assert suite.compute() == {key: pytest.approx(0, abs=1e-6)}
        suite.reset()
        suite.update(images, model_output(images.flip(-1)))
        assert suite.compute()[key] > 0


def test_lpips_is_fed_minus_one_to_one():
    """The network sees the images as given in [-1, 1] (reconstructions clamped), not [0, 1]."""

    class Recorder(torch.nn.Module):
        def forward(self, x, y):
            self.seen = (x, y)
            return torch.zeros(len(x), 1, 1, 1)

    metric = evaluators.PerceptualDistance(Recorder(), "alex", CPU)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    metric.update_pairs(images, images * 3)
    x, y = metric.network.seen
    assert torch.equal(x, images) and y.min() == -1 and y.max() == 1


def test_missing_weights_are_skipped_with_a_warning_naming_the_path(torch_home):
    expected = torch_home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.warns(UserWarning, match=re.escape(str(expected))):
        suite = evaluators.build(("reconstruction", "fid", "swd"), (8, 5), CPU)
    assert set(suite.evaluators) == {"reconstruction", "swd"}
    assert str(expected) in suite.missing["fid"] and "eval.inception_weights" in suite.missing["fid"]
    images = smooth_images(2)
    suite.update(images, model_output(images))
    assert not any(k.startswith(("fid", "isc", "kid")) for k in suite.compute())


def test_missing_weights_can_be_an_error(torch_home):
    expected = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(weights.MissingWeightsError, match=re.escape(str(expected))):
        evaluators.build(("lpips",), (8, 5), CPU, EvalConfig(missing_weights="error"))


def test_doctor_fails_naming_the_missing_files_a_preset_needs(torch_home, capsys):
    from vqlab import doctor

    assert doctor.main() != 0
    out = capsys.readouterr().out
    alexnet = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert re.search(rf"MISSING alexnet .*{re.escape(str(alexnet))}", out)
    assert "needed by reproduction" in out  # its perceptual loss
    assert "MISSING inception" in out and "eval.inception_weights" in out and "fid_reference" in out


def stand_in_named_by_its_digest(torch_home, monkeypatch, name: str) -> Path:
    """A stand-in file for ``name`` under a hub-style name carrying its own sha256 prefix, the
    registry pointed at that name."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    draft = folder / "draft.pth"
    torch.save({"weight": torch.randn(3, generator=torch.Generator().manual_seed(len(name)))}, draft)
    digest = hashlib.sha256(draft.read_bytes()).hexdigest()
    entry = dataclasses.replace(weights.REGISTRY[name], filename=f"{name}-{digest[:8]}.pth")
    monkeypatch.setitem(weights.REGISTRY, name, entry)
    return draft.rename(folder / entry.filename)


def test_doctor_passes_files_whose_sha256_matches_their_name(torch_home, monkeypatch, capsys):
    from vqlab import doctor

    path = stand_in_named_by_its_digest(torch_home, monkeypatch, "alexnet")
    assert doctor.main() == 0  # what no preset needs may be missing
    out = capsys.readouterr().out
    assert re.search(rf"ok +alexnet .*{re.escape(str(path))}", out)
    for net in ("alex", "vgg", "squeeze"):  # the heads shipped inside the lpips package
        assert re.search(rf"ok +lpips_{net} .*{net}\.pth", out)


def test_doctor_fails_on_a_file_whose_sha256_does_not_match_its_name(torch_home, monkeypatch, capsys):
    from vqlab import doctor

    stand_in_named_by_its_digest(torch_home, monkeypatch, "alexnet")
    vgg = torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    vgg.write_bytes(b"not the weights")
    assert doctor.main() != 0  # wrong even though no preset needs it
    out = capsys.readouterr().out
    assert re.search(rf"WRONG +vgg16 .*{re.escape(str(vgg))}", out) and "397923af" in out


def test_doctor_checks_every_lpips_head(torch_home, monkeypatch, tmp_path, capsys):
    from vqlab import doctor

    stand_in_named_by_its_digest(torch_home, monkeypatch, "alexnet")
    heads = tmp_path / "lpips_weights"
    heads.mkdir()
    shutil.copy(doctor.lpips_heads()["alex"], heads / "alex.pth")
    (heads / "vgg.pth").write_bytes(b"not a state dict")
    monkeypatch.setattr(doctor, "lpips_layers", lambda: heads)
    assert doctor.main() != 0
    out = capsys.readouterr().out
    assert re.search(r"ok +lpips_alex", out) and re.search(r"WRONG +lpips_vgg", out)
    assert re.search(rf"MISSING lpips_squeeze .*{re.escape(str(heads / 'squeeze.pth'))}", out)


def test_eval_config_validates_names_and_options():
    from vqlab.schema import ConfigError

    with pytest.raises(ConfigError, match="unknown evaluator"):
        EvalConfig(metrics=("reconstruction", "fdi"))
    assert {"reconstruction", "codebook", "lpips", "fid", "swd"} <= set(evaluators.registry.names())
    assert evaluators.registry.names() == sorted(EVALUATORS)  # every name the config accepts is built
    with pytest.raises(ConfigError):
        from vqlab.config import load

        load("smoke", ["eval.missing_weights=ignore"])
