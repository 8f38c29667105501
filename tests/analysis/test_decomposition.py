"""analysis.decomposition: each scheme against a case whose answer is known."""

import math

import pytest
import torch

from analysis import decomposition
from vqlab.cluster import inertia

from ..helpers import tracked_smoke_runs

LEARNED_TEST_STEPS = 600


def exact_grid(levels: list[int], count: int, seed: int = 0) -> torch.Tensor:
    """Latents whose every dimension takes only the values 0 .. L-1 (scaled by 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(level, (count,), generator=generator) * 0.5 for level in levels], -1).float()


def test_latents_on_an_exact_grid_cost_the_grid_schemes_nothing():
    train, held_out = exact_grid([4, 4, 4], 4096), exact_grid([4, 4, 4], 1024, seed=1)
    for scheme in ("uniform_grid", "scalar"):
        row = decomposition.measure(scheme, train, held_out, bits=6)
        assert row["mse"] == 0.0, scheme
        assert row["usage"] == 1.0 and row["entropy_bits"] == pytest.approx(6, abs=0.1)  # 1024 samples of 64 codes


def test_an_uneven_share_of_bits_goes_to_the_widest_dimensions():
    x = torch.randn(1000, 3) * torch.tensor([1.0, 5.0, 2.0])
    assert decomposition.levels_per_dim(x, 5) == [2, 4, 4]
    assert decomposition.levels_per_dim(x, 2) == [1, 2, 2]


def test_a_dimension_without_bits_decodes_to_its_mean_and_is_no_digit():
    x = torch.randn(4096, 3) * torch.tensor([0.1, 3.0, 2.0]) + 1.0
    codec = decomposition.uniform_grid(x, bits=2, fit=decomposition.FitSettings())
    assert codec.radices == (2, 2)
    assert torch.allclose(codec.decode(codec.encode(x))[:, 0], x[:, 0].mean().expand(4096))


def test_two_level_schemes_store_what_the_note_says():
    x = torch.randn(8192, 4)
    n, m = decomposition.split(6)
    assert (n, m) == (8, 8)
    fit = decomposition.FitSettings(min_points=8)
    assert decomposition.tree(x, 6, fit).parameters == (n + n * m) * 4
    assert decomposition.residual(x, 6, fit).parameters == (n + m) * 4
    assert decomposition.flat(x, 6, fit).parameters == n * m * 4


@pytest.mark.parametrize("scheme", decomposition.SCHEMES)
def test_codes_are_digits_within_their_radices_and_decode_to_the_codebook(scheme):
    x = torch.randn(4096, 4)
    codec = decomposition.FIT[scheme](x, 6, decomposition.FitSettings(min_points=8, learned_steps=20))
    digits = codec.encode(x[:500])
    assert digits.dtype == torch.int64 and digits.shape == (500, len(codec.radices))
    assert math.prod(codec.radices) == 2**6
    assert ((digits >= 0) & (digits < torch.tensor(codec.radices))).all()
    decoded = codec.decode(digits)
    assert decoded.shape == (500, 4)
    # greedy tree and residual encoders may pick another parent for a child; a curve's bin mean may
    # project outside its bin
    if scheme not in ("tree", "residual", "radix_learned"):
        assert torch.equal(codec.encode(decoded), digits)  # a decoded code is its own nearest code


def test_flat_kmeans_is_never_worse_than_the_structured_schemes_on_clusters():
    """With as many well-separated clusters as codes, flat k-means finds them and scalar grids cannot."""
    centres = torch.randn(16, 4, generator=torch.Generator().manual_seed(3)) * 4
    x = centres[torch.randint(16, (8192,))] + 0.01 * torch.randn(8192, 4)
    fit = decomposition.FitSettings(learned_steps=50)
    rows = {r["scheme"]: r for r in decomposition.study(x[:6144], x[6144:], [4], fit=fit, progress=False)}
    assert rows["flat"]["mse"] < 0.01
    assert all(rows["flat"]["mse"] <= rows[s]["mse"] for s in ("scalar", "uniform_grid", "radix", "product"))


def test_radix_loses_exactly_the_variance_off_its_axis():
    """Isotropic Gaussian latents: one number along the first principal axis keeps that axis and
    nothing of the others, so the MSE tends to (d - 1) / d of the variance."""
    train = torch.randn(65536, 4, generator=torch.Generator().manual_seed(1))
    held_out = torch.randn(8192, 4, generator=torch.Generator().manual_seed(2))
    row = decomposition.measure("radix", train, held_out, bits=8)
    assert row["mse"] == pytest.approx(0.75, abs=0.03)
    assert row["usage"] == 1.0 and row["entropy_bits"] == pytest.approx(8, abs=0.1)


def test_radix_on_latents_on_a_line_is_as_good_as_a_scalar_grid_of_the_same_budget():
    t = torch.rand(16384, 1)
    line = torch.cat([t, 2 * t, -t], dim=-1)
    row = decomposition.measure("radix", line[:12288], line[12288:], bits=6)
    assert row["mse"] < 1e-3  # bins of width 1/64 along the line: variance (1/64)^2 / 12 x 6


def test_a_learned_projection_follows_latents_on_a_circle_that_the_principal_axis_folds():
    """On the unit circle, the principal axis maps x and its mirror image to one number (MSE near
    a quarter of the variance); a learned 1-D map can unroll the circle."""
    generator = torch.Generator().manual_seed(5)
    angle = torch.rand(20480, generator=generator) * 2 * math.pi
    circle = torch.stack([angle.cos(), angle.sin()], dim=-1)
    fit = decomposition.FitSettings(learned_steps=LEARNED_TEST_STEPS)
    before = torch.random.get_rng_state()
    learned = decomposition.measure("radix_learned", circle[:16384], circle[16384:], bits=6, fit=fit)
    assert torch.equal(torch.random.get_rng_state(), before)
    principal = decomposition.measure("radix", circle[:16384], circle[16384:], bits=6, fit=fit)
    assert principal["mse"] > 0.2
    assert learned["mse"] < 0.1 * principal["mse"]
    again = decomposition.measure("radix_learned", circle[:16384], circle[16384:], bits=6, fit=fit)
    assert again["mse"] == learned["mse"]


def test_a_budget_with_too_few_latents_per_centroid_is_missing_not_zero():
    row = decomposition.measure("flat", torch.randn(100, 4), torch.randn(50, 4), bits=6)
    assert math.isnan(row["mse"]) and math.isnan(row["usage"])


def test_flat_is_vqlab_kmeans_whose_objective_matches_scikit_learn():
    """The study's k-means is vqlab.cluster.kmeans (tests/test_cluster.py checks it against
    scikit-learn); here: the flat scheme's held-out MSE is that objective per element."""
    x = torch.randn(2048, 4)
    codec = decomposition.flat(x, 5, decomposition.FitSettings())
    centroids = codec.decode(torch.arange(32)[:, None])
    row = decomposition.measure("flat", x, x, bits=5)
    assert row["mse"] == pytest.approx(inertia(x, centroids).item() / x.numel(), rel=1e-4)


def test_synthetic_sources_are_seeded_and_unknown_ones_are_errors():
    assert torch.equal(decomposition.synthetic("mixture", 64, 4, 1), decomposition.synthetic("mixture", 64, 4, 1))
    assert not torch.equal(decomposition.synthetic("uniform", 64, 4, 1), decomposition.synthetic("uniform", 64, 4, 2))
    with pytest.raises(ValueError, match="unknown synthetic source"):
        decomposition.synthetic("laplace", 64, 4, 1)


def test_cli_smoke_writes_the_table_and_figure_and_logs_to_mlflow(tmp_path, capsys):
    from mlflow import MlflowClient

    code = decomposition.main(["--smoke", "--sources", "uniform", "--root", str(tmp_path)])
    assert code == 0
    out = tmp_path / "decomposition" / "uniform"
    assert {p.name for p in out.iterdir()} == {"table.csv", "table.md", "distortion.png"}
    printed = capsys.readouterr().out
    assert "| flat |" in printed and "MLflow run" in printed
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("decomposition").experiment_id])
    assert [r.info.run_name for r in runs] == ["uniform"]
    history = client.get_metric_history(runs[0].info.run_id, "mse/flat")
    assert sorted(m.step for m in history) == [4, 6]
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"table.csv", "table.md", "distortion.png"}


def test_a_seed_runs_study_is_written_under_its_variant(tmp_path, capsys):
    """Every seed run of a seeded sweep is a ``seed<k>`` folder: named by it alone, the studies of
    two variants' seed 0 would share one output folder."""
    import vqlab

    overrides = {"tracking.root": str(tmp_path / "runs"), "tracking.mlflow": False, "train.steps": 2}
    overrides |= {"optim.warmup_steps": 0}
    overrides |= {"tracking.run_group": "fsq", "tracking.run_name": "seed0"}
    run = vqlab.fit(vqlab.config.load("smoke", overrides)).run_dir
    args = ["--smoke", "--sources", f"run:{run}", "--train-count", "64", "--root", str(tmp_path), "--no-mlflow"]
    assert decomposition.main(args) == 0
    assert (tmp_path / "decomposition" / "fsq" / "seed0" / "table.md").is_file()


def test_a_runs_latents_decode_to_its_own_validation_l1(tmp_path):
    """The identity (continuous) model's exact held-out latents, decoded, are its reconstructions."""
    import vqlab
    from vqlab.evaluate import evaluate_run

    overrides = {"tracking.root": str(tmp_path), "tracking.mlflow": False, "quantizer.name": "identity"}
    result = vqlab.fit(vqlab.config.load("smoke", overrides))
    latents = decomposition.run_latents(result.run_dir, train_count=64)
    cfg = vqlab.RunFolder(result.run_dir).read_config()
    assert latents.train.shape == (64 * 16, cfg.quantizer.dim)
    assert latents.held_out.shape[0] == cfg.data.val_count * 16
    l1 = evaluate_run(result.run_dir, metrics=["reconstruction"]).metrics["eval/l1"]
    assert latents.decoded_l1(latents.held_out) == pytest.approx(l1, rel=1e-5)
    assert latents.decoded_l1(torch.zeros_like(latents.held_out)) > l1


def test_an_fsq_runs_relaxed_latents_round_to_its_codes_and_decode_to_its_validation_l1(tmp_path):
    """FSQ's relaxed latents are its bounded values before rounding: rounding them on its grid is
    its own z_q (the ``trained`` row), which decodes to the run's validation L1."""
    import vqlab
    from vqlab.evaluate import evaluate_run

    overrides = {"tracking.root": str(tmp_path), "tracking.mlflow": False, "quantizer.name": "fsq"}
    result = vqlab.fit(vqlab.config.load("smoke", overrides))
    latents = decomposition.run_latents(result.run_dir, train_count=64)
    cfg = vqlab.RunFolder(result.run_dir).read_config()
    width = torch.tensor([level // 2 for level in cfg.quantizer.levels], dtype=torch.float32)
    assert latents.held_out.abs().max() <= 1.0
    torch.testing.assert_close(latents.trained, (latents.held_out * width).round() / width)
    assert latents.trained_bits == pytest.approx(math.log2(math.prod(cfg.quantizer.levels)))
    l1 = evaluate_run(result.run_dir, metrics=["reconstruction"]).metrics["eval/l1"]
    row = decomposition.trained_row(latents)
    assert row["scheme"] == "trained" and row["decoded_l1"] == pytest.approx(l1, rel=1e-5)
    assert row["mse"] > 0


def test_cli_rejects_a_missing_run_folder_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        decomposition.main(["--sources", f"run:{tmp_path / 'nothing'}", "--root", str(tmp_path)])
    assert "no run folder" in capsys.readouterr().err
    assert not (tmp_path / "decomposition").exists()


def test_the_notebook_executes_headless_and_logs_to_mlflow(tmp_path, run_notebook):
    from mlflow import MlflowClient

    outputs = run_notebook("decomposition", {"sources": "mixture", "root": str(tmp_path), "smoke": True})
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    assert any("| flat |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("decomposition").experiment_id])
    assert run.data.params["source"] == "mixture" and run.data.params["bits"] == "[4, 6]"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Two smoke tokenizers of the study's schemes (FSQ's grid, a 64-code flat VQ) in one MLflow
    experiment, and a continuous one, which has no codes."""
    root = tmp_path_factory.mktemp("runs")
    variants = {"fsq": {}, "vq": {"quantizer.name": "vq", "quantizer.codebook_size": 64}}
    return root, tracked_smoke_runs(root, variants | {"identity": {"quantizer.name": "identity"}})


def test_trained_rows_give_each_tokenizer_its_scheme_budget_and_validation_l1(tracked):
    from analysis.utilization import tracked_runs

    _, uri = tracked
    runs = tracked_runs("E", uri)
    rows = {row["run"]: row for row in decomposition.trained_rows(runs)}
    assert set(rows) == {"fsq", "vq"}  # the continuous run has no codes, so no row
    assert rows["fsq"]["scheme"] == "uniform_grid" and rows["fsq"]["bits"] == pytest.approx(math.log2(1000))
    assert rows["vq"]["scheme"] == "flat" and rows["vq"]["bits"] == 6
    for run in runs[:2]:
        assert rows[run.name]["l1"] == run.folder.last_metrics()["val/l1"]
    table = decomposition.trained_markdown(list(rows.values()))
    assert "| trained | ~6 bits | ~10 bits |" in table
    assert f"| flat | {rows['vq']['l1']:.4f} | — |" in table and "| uniform_grid | — | 0." in table


def test_cli_trained_writes_the_end_to_end_table_and_figure_and_logs_them(tracked, capsys):
    from mlflow import MlflowClient

    root, uri = tracked
    assert decomposition.main(["--trained", "E", "--tracking-uri", uri, "--root", str(root)]) == 0
    out = root / "decomposition" / "E"
    assert {p.name for p in out.iterdir()} == {"table.csv", "table.md", "end_to_end.png"}
    assert sorted(p.name for p in (root / "decomposition").iterdir()) == ["E"]  # no synthetic source ran
    assert "| uniform_grid |" in capsys.readouterr().out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("decomposition").experiment_id])
    assert run.info.run_name == "trained:E" and "l1/flat" in run.data.metrics
    assert decomposition.main(["--trained", "nothing", "--tracking-uri", uri, "--root", str(root)]) == 2
    assert "nothing" in capsys.readouterr().err


def test_the_notebook_renders_the_end_to_end_counterpart(tracked, run_notebook):
    root, uri = tracked
    parameters = {"sources": "", "trained": "E", "tracking_uri": uri, "root": str(root), "mlflow": False}
    outputs = run_notebook("decomposition", parameters)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    assert any("| uniform_grid |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
