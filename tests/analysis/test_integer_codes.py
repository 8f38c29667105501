"""analysis.integer_codes: digit statistics, locality and the priors against cases with known answers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vqlab
from analysis import integer_codes
from vqlab.models import build_autoencoder
from vqlab.runfolder import RunFolder


def uniform_digits(count: int, radices: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(r, (count,), generator=generator) for r in radices], dim=-1)


def test_independent_uniform_digits_share_no_information_and_copies_share_all():
    digits = uniform_digits(40_000, (4, 8, 2)).reshape(400, 100, 3)  # 400 crops of 100 tokens
    found = integer_codes.digit_statistics(digits, (4, 8, 2))
    assert [found[f"digit_entropy_{i}"] for i in range(3)] == pytest.approx([2, 3, 1], abs=1e-3)
    assert np.diag(found["mutual_information"]) == pytest.approx([2, 3, 1], abs=1e-3)
    assert np.abs(found["mutual_information"][~np.eye(3, dtype=bool)]).max() < 1e-3
    assert found["mean_pairwise_mi_corrected_low"] < 0 < found["mean_pairwise_mi_corrected_high"]
    assert found["code_bits"] == pytest.approx(6, abs=1e-3)
    assert found["code_bits_low"] < found["code_bits"] < found["code_bits_high"]
    copied = torch.stack([digits[..., 0], digits[..., 0]], dim=-1)
    found = integer_codes.digit_statistics(copied, (4, 4))
    assert found["mutual_information"][0, 1] == found["mean_pairwise_mi_corrected"] == pytest.approx(2, abs=1e-3)
    low, high = found["mean_pairwise_mi_corrected_low"], found["mean_pairwise_mi_corrected_high"]
    assert low < found["mean_pairwise_mi_corrected"] < high and high - low < 0.01


def test_a_grid_codebook_is_local_and_a_permuted_one_is_not():
    radices = (8, 8)
    tokens = uniform_digits(20_000, radices)
    grid = lambda digits: digits.float()  # noqa: E731 - the embedding of a digit grid is the digits
    local = integer_codes.locality(tokens, radices, grid)
    assert local["locality_digit_l1_vs_embedding"] > 0.9 and local["locality_index_vs_embedding"] > 0.3
    table = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    permuted = lambda digits: table[vqlab.codes.digits_to_index(digits, radices)]  # noqa: E731
    scrambled = integer_codes.locality(tokens, radices, permuted)
    assert all(abs(v) < 0.1 for v in scrambled.values())


def small_tokenizer(levels=(4, 4)) -> integer_codes.Tokenizer:
    cfg = vqlab.config.load("smoke", {"quantizer.levels": list(levels)})
    model = build_autoencoder(cfg.model, vqlab.quantizers.build(cfg.quantizer)).eval()
    return integer_codes.Tokenizer(model, (4, 4))


@pytest.mark.parametrize("kind", integer_codes.LIKELIHOODS)
def test_a_prior_on_iid_uniform_codes_reaches_log2_k_bits_per_token(kind):
    tokenizer = small_tokenizer()
    train = uniform_digits(4096 * 16, (4, 4), seed=1).reshape(4096, 16, 2)
    held_out = uniform_digits(512 * 16, (4, 4), seed=2).reshape(512, 16, 2)
    images = torch.zeros(512, 3, 32, 32)
    size = integer_codes.size_prior(kind, (4, 4), 16, target=40_000)  # a small prior: nothing to learn
    result = integer_codes.train_prior(kind, tokenizer, train, held_out, images, size, max_steps=150)
    assert result.bits_per_token == pytest.approx(4, abs=0.1)
    assert result.accuracy < 0.15  # nothing to predict: about 1 in 16


def test_a_prior_learns_a_deterministic_sequence():
    tokenizer = small_tokenizer()
    sequence = uniform_digits(16, (4, 4), seed=3)[None].expand(256, -1, -1)  # every image the same codes
    embed_dim = tokenizer.embed(sequence[:1, 0]).shape[-1]
    sizes = integer_codes.matched_sizes(integer_codes.PRIORS, (4, 4), 16, embed_dim, target=40_000)
    for kind in integer_codes.PRIORS:
        result = integer_codes.train_prior(
            kind, tokenizer, sequence, sequence[:8], torch.zeros(8, 3, 32, 32), sizes[kind], max_steps=150
        )
        assert result.accuracy > 0.9, kind
        if kind != "regression":
            assert result.bits_per_token < 0.5, kind
        else:
            assert math.isnan(result.bits_per_token)


def test_the_chain_rule_prior_pays_only_for_the_first_digit_when_the_second_copies_it():
    """Tokens (d, d) with d uniform over 8: 3 bits each. The flat and the autoregressive priors can
    reach 3; independent per-digit heads pay H(d0) + H(d1) = 6."""
    tokenizer = small_tokenizer((8, 8))
    first = uniform_digits(2048 * 16, (8,), seed=5)
    train = torch.cat([first, first], dim=-1).reshape(2048, 16, 2)
    first = uniform_digits(256 * 16, (8,), seed=6)
    val = torch.cat([first, first], dim=-1).reshape(256, 16, 2)
    sizes = integer_codes.matched_sizes(integer_codes.LIKELIHOODS, (8, 8), 16, target=40_000)
    bits = {
        kind: integer_codes.train_prior(
            kind, tokenizer, train, val, torch.zeros(256, 3, 32, 32), sizes[kind], max_steps=300, lr=3e-3
        ).bits_per_token
        for kind in integer_codes.LIKELIHOODS
    }
    assert bits["autoregressive"] == pytest.approx(3, abs=0.15)
    assert bits["flat"] == pytest.approx(3, abs=0.15)
    assert bits["factorised"] == pytest.approx(6, abs=0.15)


@pytest.mark.parametrize("kind", integer_codes.LIKELIHOODS)
def test_sampled_sequences_come_with_the_probabilities_the_prior_assigns_them(kind):
    """Every sequence of 2 tokens of radices (2, 3): its exact probability from the prior's own loss
    (nats per token x tokens), against its frequency among 30000 ancestral samples. A sampler that
    dropped the dependence on the past, or on the token's earlier digits, would fail the chi-square."""
    from scipy import stats

    from vqlab.codes import index_to_digits

    torch.manual_seed(0)
    radices, length = (2, 3), 2
    prior = integer_codes.Prior(kind, radices, length, width=16, layers=1).eval()
    with torch.no_grad():
        for parameter in [*prior.head.parameters(), prior.position, prior.start]:
            parameter.mul_(4)  # far from uniform, and each token's past matters
    tokens = index_to_digits(torch.arange(6), radices)  # (6, 2)
    sequences = torch.stack([tokens.repeat_interleave(6, 0), tokens.repeat(6, 1)], dim=1)  # (36, 2, 2)
    with torch.no_grad():
        probability = torch.tensor([math.exp(-length * prior.loss(prior(s[None]), s[None]).item()) for s in sequences])
    assert probability.sum().item() == pytest.approx(1, abs=1e-4)
    assert probability.max() > 4 * probability.min()  # the check below has something to tell apart
    drawn = prior.sample(30_000, length, torch.Generator().manual_seed(1))
    observed = ((drawn[:, None] == sequences[None]).flatten(2).all(-1)).sum(0)  # (36,)
    assert observed.sum() == 30_000
    expected = probability.double().numpy() / probability.double().sum().item() * 30_000
    assert stats.chisquare(observed.numpy(), expected).pvalue > 1e-3


def test_regression_rollouts_start_from_the_given_tokens_and_need_no_randomness():
    tokenizer = small_tokenizer()
    prior = integer_codes.Prior("regression", (4, 4), 16, embed_dim=tokenizer.embed(torch.zeros(1, 2).long()).shape[-1])
    first = uniform_digits(10, (4, 4), seed=7)
    rollouts = [prior.eval().sample(10, 16, torch.Generator().manual_seed(s), tokenizer, first) for s in (0, 1)]
    assert torch.equal(rollouts[0], rollouts[1])
    assert torch.equal(rollouts[0][:, 0], first)
    assert rollouts[0].shape == (10, 16, 2) and rollouts[0].max() < 4


def test_set_swd_compares_unpaired_sets_as_distributions():
    generator = torch.Generator().manual_seed(0)

    def blocks(size: int) -> torch.Tensor:  # 128 images of random colour blocks of this size
        return torch.nn.functional.interpolate(torch.rand(128, 3, 32 // size, 32 // size, generator=generator), size=32)

    images = blocks(4) * 2 - 1
    assert integer_codes.set_swd(images, images) == 0
    same_kind = integer_codes.set_swd(images, blocks(4) * 2 - 1)  # other images of the same distribution
    shuffled = integer_codes.set_swd(images, images[torch.randperm(128, generator=generator)])
    other_kind = integer_codes.set_swd(images, blocks(8) * 2 - 1)
    assert 0 < shuffled < other_kind / 1.5 and same_kind < other_kind / 1.5  # about half, at this count


def test_unigram_codes_draw_only_tokens_of_the_training_codes():
    train = uniform_digits(64, (4, 4), seed=8).reshape(4, 16, 2)
    drawn = integer_codes.unigram_codes(train, 50, 16, torch.Generator().manual_seed(0))
    assert drawn.shape == (50, 16, 2)
    seen = {tuple(t) for t in train.flatten(0, 1).tolist()}
    assert {tuple(t) for t in drawn.flatten(0, 1).tolist()} <= seen


@pytest.mark.parametrize("radices", [(8, 5, 5, 5), (32, 32), (2,) * 10])
def test_every_prior_is_sized_within_a_percent_of_the_flat_one_at_width_128(radices):
    length, embed_dim = 64, 32
    sizes = integer_codes.matched_sizes(integer_codes.PRIORS, radices, length, embed_dim)
    target = sizes["flat"].parameters
    assert sizes["flat"].width == 128
    for kind, size in sizes.items():
        assert size.parameters == pytest.approx(target, rel=0.01), kind
        built = integer_codes.Prior(kind, radices, length, embed_dim, size.width, feedforward=size.feedforward)
        assert sum(p.numel() for p in built.parameters()) == size.parameters
    with pytest.raises(ValueError, match="smallest width"):
        integer_codes.size_prior("flat", radices, length, target=100)


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    module = torch.nn.Linear(1, 1)
    stopping = integer_codes.EarlyStopping(patience=2)
    stops = []
    for step, loss in enumerate([3.0, 2.0, 2.5, 1.5, 1.6, 1.7, 1.0]):
        with torch.no_grad():
            module.weight.fill_(step)
        stops.append(stopping.update(step, loss, module))
        if stops[-1]:
            break
    assert stops == [False] * 5 + [True]  # two evaluations without a better loss than 1.5
    assert stopping.best_step == 3 and stopping.best == 1.5
    stopping.restore(module)
    assert module.weight.item() == 3


def test_a_prior_that_overfits_stops_early_with_its_best_held_out_weights():
    """24 random sequences to memorise: the held-out loss falls, then rises as the prior learns them."""
    tokenizer = small_tokenizer()
    train = uniform_digits(32 * 16, (4, 4), seed=7).reshape(32, 16, 2)
    size = integer_codes.size_prior("flat", (4, 4), 16, target=60_000)
    result = integer_codes.train_prior(
        "flat",
        tokenizer,
        train,
        train[:4],
        torch.zeros(4, 3, 32, 32),
        size,
        max_steps=3000,
        eval_every=10,
        patience=5,
        held_out_share=0.25,
        lr=3e-3,
    )
    held_out = [point["held_out"] for point in result.curve]
    assert result.stopped_at < 3000 and result.stopped_at == result.curve[-1]["step"]
    assert result.best_step == result.curve[int(np.argmin(held_out))]["step"] < result.stopped_at
    assert result.held_out_loss == min(held_out) < held_out[-1]  # the kept weights are the best's
    assert result.curve[-1]["train"] < result.curve[0]["train"]


def test_a_shift_of_a_constant_image_changes_no_code_and_sensitivity_is_per_digit():
    tokenizer = small_tokenizer()
    images = torch.full((4, 3, 32, 32), 0.3)
    found = tokenizer.encode(images)
    assert integer_codes.stability(tokenizer, images, found)["changed_under_shift"] == 0
    per_digit = integer_codes.sensitivity(tokenizer, found)
    assert len(per_digit) == 2 and all(v > 0 for v in per_digit)


@pytest.mark.parametrize("name", ["fsq", "lfq", "vq"])
def test_the_nearest_code_of_each_codes_embedding_is_that_code(name):
    options = {
        "fsq": {"quantizer.levels": [5, 3]},
        "lfq": {"quantizer.dim": 4},
        "vq": {"quantizer.codebook_size": 32, "quantizer.init": "normal", "quantizer.dead_code_steps": 0},
    }
    cfg = vqlab.config.load("smoke", {"quantizer.name": name, **options[name]})
    tokenizer = integer_codes.Tokenizer(
        build_autoencoder(cfg.model, vqlab.quantizers.build(cfg.quantizer)).eval(), (4, 4)
    )
    every = vqlab.codes.index_to_digits(torch.arange(math.prod(tokenizer.radices)), tokenizer.radices)
    assert torch.equal(tokenizer.nearest_code(tokenizer.embed(every)), every)


def test_unknown_priors_are_errors():
    with pytest.raises(ValueError, match="unknown prior"):
        integer_codes.Prior("lstm", (4, 4), 16)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    overrides = {"tracking.root": str(root), "tracking.mlflow": False, "train.steps": 4, "optim.warmup_steps": 0}
    return vqlab.fit(vqlab.config.load("smoke", overrides)).run_dir


def test_cli_smoke_on_a_trained_run_writes_and_logs(trained_run, tmp_path, capsys):
    from mlflow import MlflowClient

    run_dir = trained_run
    assert integer_codes.main(["--runs", str(run_dir), "--smoke", "--root", str(tmp_path)]) == 0
    folder = tmp_path / "integer_codes" / Path(run_dir).name
    assert {p.name for p in folder.iterdir()} == {
        "result.json",
        "mutual_information.png",
        "sensitivity.png",
        "prior_curves.png",
        "samples.png",
    }
    out = capsys.readouterr().out
    assert "| flat bits |" in out.replace("| factorised bits |", "| flat bits |")
    assert "| regression rollouts |" in out and "Generative check" in out
    assert (tmp_path / "integer_codes" / "priors.png").stat().st_size > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("integer_codes").experiment_id])
    by_name = {run.info.run_name: run for run in runs}
    assert by_name.keys() == {Path(run_dir).name, "table"}
    logged = {artifact.path for artifact in client.list_artifacts(by_name["table"].info.run_id)}
    assert logged == {"table.md", "priors.png"} and by_name["table"].data.params["runs"] == Path(run_dir).name
    metrics = by_name[Path(run_dir).name].data.metrics
    assert {"prior_flat_bits", "prior_factorised_bits", "locality_index_vs_embedding", "digit_entropy_0"} <= set(
        metrics
    )
    assert 0 <= metrics["prior_flat_accuracy"] <= 1
    swd = {
        key: metrics[key] for key in ("swd_reconstructions", "swd_unigram", "prior_flat_swd", "prior_regression_swd")
    }
    assert all(value > 0 for value in swd.values()), swd


def test_the_priors_figure_shows_each_priors_bits_with_its_interval_beside_the_codes_rate():
    results = []
    for i, name in enumerate(("a/seed0", "b/seed0")):
        result = {"name": name, "code_bits": 7.0 + i, "code_bits_low": 6.9 + i, "code_bits_high": 7.2 + i}
        for j, kind in enumerate(integer_codes.LIKELIHOODS):
            mean = 6.0 - j + i
            result |= {f"prior_{kind}_bits": mean, f"prior_{kind}_bits_low": mean - 0.1 * (j + 1)}
            result |= {f"prior_{kind}_bits_high": mean + 0.1 * (j + 1)}
        results.append(result)
    (ax,) = integer_codes.priors_figure(results).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a/seed0", "b/seed0"]
    assert [c.get_label() for c in ax.containers] == ["code (no context)", *integer_codes.LIKELIHOODS]
    keys = ["code_bits", *(f"prior_{kind}_bits" for kind in integer_codes.LIKELIHOODS)]
    for container, key in zip(ax.containers, keys, strict=True):
        line, _, (bars,) = container
        assert line.get_ydata().tolist() == pytest.approx([r[key] for r in results])
        spans = [value for segment in bars.get_segments() for value in (segment[0][1], segment[1][1])]
        assert spans == pytest.approx([r[f"{key}_{end}"] for r in results for end in ("low", "high")])


def test_runs_at_once_share_the_threads_and_runs_one_at_a_time_get_them_all(monkeypatch):
    monkeypatch.setattr(integer_codes.torch, "get_num_threads", lambda: 8)
    cases = [(1, 5), (2, 5), (4, 2), (3, 1), (16, 20)]  # (jobs, runs)
    assert [integer_codes.at_once(jobs, runs) for jobs, runs in cases] == [1, 2, 2, 1, 16]
    assert [integer_codes.threads_per_run(jobs, runs) for jobs, runs in cases] == [8, 4, 4, 8, 1]


def test_seed_runs_of_two_variants_keep_their_own_rows_and_folders(tmp_path, capsys):
    """A seeded sweep's runs are all ``seed<k>`` folders: named by their folder alone, the second
    variant's results would overwrite the first's."""
    root = tmp_path / "runs"
    base = {"tracking.root": str(root), "tracking.mlflow": False, "train.steps": 2, "optim.warmup_steps": 0}
    base |= {"tracking.run_name": "seed0"}
    variants = {"fsq": {}, "vq": {"quantizer.name": "vq", "quantizer.codebook_size": 64}}
    runs = [
        vqlab.fit(vqlab.config.load("smoke", base | {"tracking.run_group": name} | overrides)).run_dir
        for name, overrides in variants.items()
    ]
    args = ["--runs", *map(str, runs), "--smoke", "--no-mlflow", "--priors", "flat", "--root", str(tmp_path)]
    assert integer_codes.main([*args, "--jobs", "2"]) == 0  # two processes, a thread each
    written = {}
    for name in variants:
        written[name] = json.loads((tmp_path / "integer_codes" / name / "seed0" / "result.json").read_text())
        assert written[name]["name"] == f"{name}/seed0" and written[name]["quantizer"] == name
    table = (tmp_path / "integer_codes" / "table.md").read_text()
    assert table.index("| fsq/seed0 | fsq |") < table.index("| vq/seed0 | vq |")  # the order given
    # a run analysed in its own process equals the same run analysed here, at one thread both
    settings = {k: v for k, v in integer_codes.SMOKE.items()} | {"priors": ("flat",), "progress": False}
    here = integer_codes.analyse_run(runs[1], **settings)
    for key in ("prior_flat_bits", "code_bits", "swd_unigram", "prior_flat_swd", "locality_index_vs_embedding"):
        assert written["vq"][key] == here[key], key


def test_a_rerun_reuses_results_made_with_the_same_settings_and_only_those(trained_run, tmp_path, monkeypatch, capsys):
    args = ["--runs", str(trained_run), "--smoke", "--no-mlflow", "--priors", "flat", "--root", str(tmp_path)]
    assert integer_codes.main(args) == 0
    table = (tmp_path / "integer_codes" / "table.md").read_text()
    analysed = []
    real = integer_codes.analyse_run
    monkeypatch.setattr(integer_codes, "analyse_run", lambda run, **kw: analysed.append(kw) or real(run, **kw))
    capsys.readouterr()
    assert integer_codes.main(args) == 0  # the same settings: read back, not analysed
    assert analysed == [] and "reusing" in capsys.readouterr().out
    assert (tmp_path / "integer_codes" / "table.md").read_text() == table
    assert integer_codes.main([*args, "--patience", "3"]) == 0  # other settings: analysed again
    assert [kw["patience"] for kw in analysed] == [3]
    assert integer_codes.main([*args, "--patience", "3", "--again"]) == 0
    assert len(analysed) == 2


def test_cli_rejects_a_missing_run_folder_before_any_work(tmp_path, capsys):
    assert integer_codes.main(["--runs", str(tmp_path / "nothing"), "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: no run folder (config.yaml) at {tmp_path / 'nothing'}\n"


def test_cli_rejects_a_run_without_checkpoints_in_one_line(trained_run, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    RunFolder(bare).config_file.write_text(RunFolder(trained_run).config_file.read_text())
    assert integer_codes.main(["--runs", str(bare), "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: no checkpoint in {RunFolder(bare).checkpoints}\n"
    assert not (tmp_path / "integer_codes").exists()


def test_the_notebook_executes_headless(trained_run, tmp_path, run_notebook):
    outputs = run_notebook(
        "integer_codes", {"runs": str(trained_run), "root": str(tmp_path), "mlflow": False, "smoke": True}
    )
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4 + 1  # each run's figures, then priors.png
    assert any("| flat bits |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
