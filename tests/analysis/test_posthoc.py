"""analysis.posthoc: post-hoc schemes on each seed's continuous model beside the co-trained tokenizers."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import decomposition, posthoc
from vqlab.report import half_width
from vqlab.runfolder import RunFolder

SEEDS = (0, 1)
SCHEMES = ("flat", "uniform_grid", "radix")
VARIANTS = {  # name -> (overrides, floor)
    "identity-d2": ({"quantizer.name": "identity", "quantizer.dim": 2}, None),
    "identity-d1": ({"quantizer.name": "identity", "quantizer.dim": 1}, None),
    "vq": ({"quantizer.name": "vq", "quantizer.codebook_size": 16, "quantizer.dim": 2}, "identity-d2"),
    "fsq,dtype=fp32": ({"quantizer.name": "fsq", "quantizer.levels": [4, 4]}, "identity-d2"),  # a grid point's name
    "radix": ({"quantizer.name": "radix", "quantizer.radices": [4, 4], "quantizer.dim": 1}, "identity-d1"),
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A seeded sweep as ``vqlab.sweep`` tags it, 4 smoke steps a run: two seeds of two floors
    (widths 1 and 2) and three tokenizers of the schemes (flat VQ and FSQ at width 2, radix at 1)."""
    import vqlab

    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root}/mlflow.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for seed in SEEDS:
        for name, (overrides, floor) in VARIANTS.items():
            tags = {"variant": name, "seed": str(seed)} | ({"floor": floor} if floor else {})
            tracking = {"tracking.root": str(root), "tracking.mlflow": True, "tracking.mlflow_uri": uri}
            tracking |= {"tracking.experiment": "E"}
            tracking |= {"tracking.run_group": name, "tracking.run_name": f"seed{seed}", "tracking.tags": tags}
            recipe = {"train.steps": 4, "optim.warmup_steps": 0, "train.seed": seed}
            vqlab.fit(vqlab.config.load("smoke", tracking | recipe | overrides))
    torch.set_num_threads(threads)
    return root, uri


def last_l1(root, variant: str, seed: int) -> float:
    return RunFolder(root / "E" / variant / f"seed{seed}").last_metrics()["val/l1"]


def test_each_quantizer_trains_the_scheme_of_its_decomposition():
    vq = {"name": "vq", "codebook_size": 32, "dim": 2}
    fsq = {"name": "fsq", "levels": (8, 4)}
    assert posthoc.scheme_of(_parsed(vq)) == "flat"
    assert posthoc.scheme_of(_parsed({"name": "rvq", "depth": 2, "base": vq})) == "residual"
    assert posthoc.scheme_of(_parsed({"name": "product", "groups": 2, "base": vq})) == "product"
    assert posthoc.scheme_of(_parsed({"name": "rvq", "depth": 2, "base": fsq})) is None  # a grid, not k-means stages
    assert posthoc.scheme_of(_parsed({"name": "tree_vq", "parents": 4, "children": 4, "dim": 2})) == "tree"
    assert posthoc.scheme_of(_parsed(fsq)) == "uniform_grid"
    assert posthoc.scheme_of(_parsed({"name": "learned_grid", "levels": (8, 4)})) == "scalar"
    assert posthoc.scheme_of(_parsed({"name": "radix"})) == "radix"
    assert posthoc.scheme_of(_parsed({"name": "lfq", "dim": 4})) is None


def _parsed(options: dict):
    from vqlab.quantizers import QuantizerConfig
    from vqlab.schema import parse

    return parse(QuantizerConfig, options)


@pytest.fixture(scope="module")
def analysed(sweep, tmp_path_factory):
    root, uri = sweep
    out = tmp_path_factory.mktemp("posthoc")
    fit = decomposition.FitSettings(min_points=8, learned_steps=10)
    result, files = posthoc.analyse("E", out, uri, width=2, bits=[4], schemes=SCHEMES, train_count=64, fit=fit)
    return root, uri, out, result, files, fit


def test_every_seed_has_each_post_hoc_scheme_and_each_tokenizer_with_its_own_floors_gap(analysed):
    root, _, _, result, _, _ = analysed
    seeds = result["seeds"]
    fitted, trained = seeds[seeds["side"] == "post-hoc"], seeds[seeds["side"] == "co-trained"]
    assert sorted(zip(fitted["scheme"], fitted["seed"], strict=True)) == sorted(
        (s, seed) for s in SCHEMES for seed in SEEDS
    )
    assert set(trained["variant"]) == {"vq", "fsq,dtype=fp32", "radix"} and len(trained) == 2 * 3
    for row in fitted.itertuples():  # the post-hoc cost is to the width-2 model of the same seed
        gap = row.l1 - last_l1(root, "identity-d2", row.seed)
        assert seeds.loc[row.Index, "quantization gap"] == pytest.approx(gap)
    for row in trained.itertuples():  # radix's floor is the 1-dimensional model
        floor = "identity-d1" if row.variant == "radix" else "identity-d2"
        assert row.l1 == pytest.approx(last_l1(root, row.variant, row.seed))
        assert seeds.loc[row.Index, "quantization gap"] == pytest.approx(row.l1 - last_l1(root, floor, row.seed))
    vq = trained[trained["variant"] == "vq"]
    assert (vq["bits"] == 4).all() and vq["measured bits"].between(0, 4.5).all()


def test_post_hoc_l1_is_the_scheme_decoded_by_that_seeds_continuous_model(analysed):
    root, _, _, result, _, fit = analysed
    latents = decomposition.run_latents(root / "E" / "identity-d2" / "seed1", train_count=64)
    again = decomposition.measure("flat", latents.train, latents.held_out, 4, fit, latents.decoded_l1)
    seeds = result["seeds"]
    row = seeds[(seeds["side"] == "post-hoc") & (seeds["scheme"] == "flat") & (seeds["seed"] == 1)].iloc[0]
    assert row["l1"] == pytest.approx(again["decoded_l1"], rel=1e-6)
    assert row["mse"] == pytest.approx(again["mse"], rel=1e-6)
    assert row["measured bits"] > again["entropy_bits"]  # Miller–Madow adds to the plug-in


def test_rows_are_means_over_seeds_with_t_intervals_and_differences_are_paired(analysed):
    _, _, _, result, _, _ = analysed
    seeds, table, paired = result["seeds"], result["summary"], result["comparisons"]
    vq = seeds[seeds["variant"] == "vq"].set_index("seed")["l1"]
    row = table[table["variant"] == "vq"].iloc[0]
    assert row["n"] == 2 and row["l1"] == pytest.approx(vq.mean())
    assert row["l1_ci"] == pytest.approx(half_width(vq.to_numpy()))
    flat = seeds[(seeds["side"] == "post-hoc") & (seeds["scheme"] == "flat")].set_index("seed")["l1"]
    against = paired[paired["what"] == "vq − post-hoc flat"].iloc[0]
    differences = (vq - flat).to_numpy()
    assert against["difference"] == pytest.approx(differences.mean()) and against["n"] == 2
    assert against["ci"] == pytest.approx(half_width(differences)) and against["pairing"] == "paired"
    fsq = seeds[seeds["variant"] == "fsq,dtype=fp32"].set_index("seed")["l1"]
    kmeans = paired[paired["what"] == "fsq,dtype=fp32 − post-hoc flat"].iloc[0]
    assert kmeans["difference"] == pytest.approx((fsq - flat).mean())
    grid = paired[paired["what"] == "fsq,dtype=fp32 − flat"].iloc[0]
    assert grid["comparison"] == "co-trained: scheme − flat"
    assert grid["difference"] == pytest.approx((fsq - vq).mean())
    radix = seeds[(seeds["side"] == "post-hoc") & (seeds["scheme"] == "radix")].set_index("seed")["l1"]
    assert paired.loc[paired["what"] == "radix − flat", "difference"].tolist() == [
        pytest.approx((radix - flat).mean()),
        pytest.approx((seeds[seeds["variant"] == "radix"].set_index("seed")["l1"] - vq).mean()),
    ]


def test_files_hold_the_tables_and_the_figure(analysed):
    _, _, out, _, files, _ = analysed
    assert {p.name for p in (out / "E").iterdir()} == {
        "seeds.csv",
        "table.csv",
        "table.md",
        "rate_distortion.png",
        "fits",
    }
    assert {p.name for p in (out / "E" / "fits").iterdir()} == {"identity-d2-seed0.json", "identity-d2-seed1.json"}
    text = (out / "E" / "table.md").read_text()
    assert "| post-hoc | flat | identity-d2 | 2 |" in text and "| co-trained | radix | radix | 2 |" in text
    assert "| identity-d1 | 1 | 2 |" in text and "vq − post-hoc flat" in text and "Kendall's tau" in text
    assert len(pd.read_csv(out / "E" / "seeds.csv")) == 2 * (len(SCHEMES) + 3)
    assert files[-1].stat().st_size > 0


def test_a_rerun_reads_each_floors_kept_fits_and_fits_again_what_changed(analysed, monkeypatch):
    _, uri, out, result, _, fit = analysed
    fitted = []
    latents = posthoc.run_latents
    monkeypatch.setattr(posthoc, "run_latents", lambda run_dir, *a: fitted.append(run_dir) or latents(run_dir, *a))
    again, _ = posthoc.analyse("E", out, uri, width=2, bits=[4], schemes=SCHEMES, train_count=64, fit=fit)
    assert fitted == []  # the co-trained rows are read again, the fits are not made again
    pd.testing.assert_frame_equal(again["seeds"], result["seeds"])
    kept = out / "E" / "fits" / "identity-d2-seed1.json"
    kept.write_text(kept.read_text().replace('"train_count": 64', '"train_count": 65'))  # made otherwise
    posthoc.analyse("E", out, uri, width=2, bits=[4], schemes=SCHEMES, train_count=64, fit=fit)
    assert [Path(p).name for p in fitted] == ["seed1"]
    posthoc.analyse("E", out, uri, width=2, bits=[4], schemes=("flat",), train_count=64, fit=fit)
    posthoc.analyse("E", out, uri, width=2, bits=[4], schemes=("flat",), train_count=64, fit=fit, again=True)
    assert len(fitted) == 1 + 2 + 2  # other schemes: both floors; --again: both again


def test_orders_by_mse_and_by_decoded_l1_are_compared_per_budget():
    rows = [
        {"side": "post-hoc", "scheme": "a", "bits": 10, "mse": 1.0, "l1": 0.3},
        {"side": "post-hoc", "scheme": "b", "bits": 10, "mse": 2.0, "l1": 0.2},
        {"side": "post-hoc", "scheme": "a", "bits": 6, "mse": 1.0, "l1": 0.2},
        {"side": "post-hoc", "scheme": "b", "bits": 6, "mse": 2.0, "l1": 0.3},
        {"side": "co-trained", "scheme": "a", "bits": 10, "mse": math.nan, "l1": 0.1},
    ]
    six, ten = posthoc.disagreements(pd.DataFrame(rows))
    assert six.startswith("6 bits") and "+1.00" in six and "agree" in six
    assert ten.startswith("10 bits") and "-1.00" in ten and "a < b in MSE, > in L1" in ten


def test_cli_prints_writes_and_logs_and_rejects_a_width_without_floor(sweep, capsys):
    from mlflow import MlflowClient

    root, uri = sweep
    argv = ["E", "--width", "2", "--bits", "4", "--schemes", "flat", "--tracking-uri", uri, "--root", str(root)]
    assert posthoc.main([*argv, "--smoke"]) == 0
    assert "| post-hoc | flat |" in capsys.readouterr().out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("decomposition").experiment_id])
    assert run.info.run_name == "posthoc:E" and "l1/post-hoc/flat" in run.data.metrics
    assert {"l1/co-trained/vq", "l1/co-trained/fsq_dtype_fp32"} <= set(run.data.metrics)  # no comma, no =
    assert posthoc.main(["E", "--width", "3", "--tracking-uri", uri, "--root", str(root / "none")]) == 2
    err = capsys.readouterr().err
    assert "no identity floor of width 3" in err and "[1, 2]" in err
    assert not (root / "none" / "posthoc").exists()


def test_the_decomposition_notebook_shows_the_post_hoc_comparison(sweep, run_notebook):
    root, uri = sweep
    parameters = {"sources": "", "posthoc": "E", "posthoc_width": 2, "tracking_uri": uri, "root": str(root)}
    outputs = run_notebook("decomposition", parameters | {"mlflow": False, "smoke": True})
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    shown = [o.get("data", {}).get("text/markdown", "") for o in outputs]
    assert any("| co-trained | flat | vq | 2 |" in text for text in shown)
