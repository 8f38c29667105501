import subprocess
import sys

import pytest

import vqlab
from vqlab.config import RunConfig, from_yaml, load, presets, to_yaml
from vqlab.schema import ConfigError


@pytest.mark.parametrize("preset", presets())
def test_every_preset_round_trips_exactly(preset):
    cfg = load(preset)
    text = to_yaml(cfg)
    assert from_yaml(text) == cfg
    assert to_yaml(from_yaml(text)) == text


def test_defaults_round_trip():
    assert from_yaml(to_yaml(RunConfig())) == RunConfig()


def test_reading_a_config_imports_no_evaluator():
    """The evaluators import the config (their options), never the other way round."""
    check = (
        "import sys, vqlab.config; "
        "vqlab.config.load('smoke', ['eval.metrics=[reconstruction,codebook,swd]']); "
        "loaded = sorted(m for m in sys.modules if m.startswith('vqlab.evaluators')); "
        "assert not loaded, loaded"
    )
    found = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr


def test_overrides_from_the_command_line_and_from_dicts_agree():
    cli = load("smoke", ["optim.lr=3e-4", "quantizer.levels=[7,5,5,5,5]", "train.dtype=bf16", "data.flip=false"])
    notebook = load(
        "smoke", {"optim.lr": 3e-4, "quantizer.levels": [7, 5, 5, 5, 5], "train.dtype": "bf16", "data.flip": False}
    )
    assert cli == notebook
    assert cli.optim.lr == 3e-4 and isinstance(cli.optim.lr, float)
    assert cli.quantizer.levels == (7, 5, 5, 5, 5)


def test_switching_quantizer_starts_its_section_afresh():
    cfg = load("smoke", ["quantizer.name=sfsq"])
    assert type(cfg.quantizer).__name__ == "SFSQConfig"
    assert cfg.quantizer.levels == type(cfg.quantizer)().levels
    cfg = load("smoke", ["quantizer.levels=[5,5]", "quantizer.name=sfsq"])
    assert cfg.quantizer.levels == (5, 5)


def test_integers_are_accepted_for_floats_but_not_the_reverse():
    assert load("smoke", ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.steps.*integer"):
        load("smoke", ["train.steps=1.5"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.stepz=3", "train.stepz"),
        ("nosuchsection.a=1", "nosuchsection"),
        ("train.steps=abc", "train.steps"),
        ("tracking.mlflow=1", "tracking.mlflow"),
        ("data.batch_size=0", "data.batch_size"),
        ("quantizer.levels=[8,1,5]", "quantizer.levels"),
        ("quantizer.levels=8", "quantizer.levels"),
        ("quantizer.name=nope", "quantizer.name"),
        ("optim.schedule=exponential", "optim.schedule"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("data.image_size=36", "data.image_size"),
        ("optim.warmup_steps=100000", "optim.warmup_steps"),
        ("eval.metrics=[fid_typo]", "eval.metrics[0]"),
        ("data.name=imagefolder", "data.root"),
        ("train=3", "train"),
        ("train.steps", "train.steps"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load("smoke", [override])
    assert err.value.key == key
    assert str(err.value).startswith(key)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load("no-such-preset")
    with pytest.raises(ConfigError, match="does not exist"):
        load(str(tmp_path / "missing.yaml"))


def test_a_yaml_file_is_a_source(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(load("smoke", ["train.steps=7"])))
    assert load(str(path)).train.steps == 7


def test_configs_are_frozen():
    cfg = load("smoke")
    with pytest.raises(AttributeError):
        cfg.train.steps = 3  # type: ignore[misc]


def test_public_api_names():
    assert {"fsq", "sfsq"} <= set(vqlab.quantizers.available())
    q = vqlab.quantizers.build("fsq", levels=[8, 5, 5, 5])
    assert q.dim == 4 and q.codebook_size == 1000


def test_no_public_name_is_both_a_module_and_a_function():
    import importlib.util
    import inspect

    for name in vqlab.__all__:
        value = getattr(vqlab, name)
        has_module = importlib.util.find_spec(f"vqlab.{name}") is not None
        assert inspect.ismodule(value) == has_module, name
    importlib.import_module("vqlab.train")  # the command line's module, imported as a user would
    assert vqlab.fit is vqlab.trainer.fit


def test_switching_a_nested_variant_starts_it_afresh():
    cfg = load("rvq", ["quantizer.base.name=vq", "quantizer.base.dim=8"])
    assert cfg.quantizer.base.name == "vq" and cfg.quantizer.base.dim == 8
    assert load("rvq", ["quantizer.base.levels=[5,5]"]).quantizer.base.levels == (5, 5)


def test_switching_data_source_keeps_the_data_section():
    cfg = load("smoke", ["data.name=shapes"])
    assert cfg.data.name == "shapes" and cfg.data.batch_size == load("smoke").data.batch_size


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 3\n  seed: [1, 2\noptim:\n  lr: 1\n")
    with pytest.raises(ConfigError) as err:
        load(str(path))
    message = str(err.value)
    assert str(path) in message and "line 4" in message
    assert "\n" not in message and "<unicode string>" not in message


def test_a_directory_as_config_says_so(tmp_path):
    for folder in (tmp_path / "configs", tmp_path / "configs.yaml"):
        folder.mkdir()
        with pytest.raises(ConfigError, match=f"{folder} is a directory"):
            load(str(folder))


def test_a_config_file_that_is_not_text_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match=f"cannot read config file {path}"):
        load(str(path))


def test_a_key_given_twice_in_overrides_is_an_error():
    with pytest.raises(ConfigError) as err:
        load("smoke", ["train.steps=5", "optim.lr=1e-3", "train.steps=7"])
    assert err.value.key == "train.steps"
    assert load("smoke", ["train.steps=7", "train.seed=7"]).train.steps == 7


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("train:\n  steps: 5\n  steps: 7\n", "train.steps", "lines 2 and 3"),
        ("train:\n  steps: 5\noptim:\n  lr: 1.0\ntrain:\n  seed: 3\n", "train", "lines 1 and 5"),
        ("eval:\n  metrics: [{a: 1, a: 2}]\n", "eval.metrics[0].a", "lines 2 and 2"),
    ],
)
def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path, text, key, lines):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert err.value.key == key
    assert str(path) in str(err.value) and lines in str(err.value)


def test_yaml_merge_keys_may_be_overridden():
    text = "base: &b {steps: 5, seed: 1}\ntrain:\n  <<: *b\n  steps: 9\n"
    assert vqlab.config.parse_yaml(text, "x.yaml")["train"] == {"steps": 9, "seed": 1}


def test_a_bad_override_value_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as err:
        load("smoke", ["quantizer.levels=[8,5"])
    assert err.value.key == "quantizer.levels"
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), "inf", "nan"])
def test_non_finite_floats_are_config_errors_naming_the_key(value):
    with pytest.raises(ConfigError, match="finite") as err:
        load("smoke", {"quantizer.name": "vq", "quantizer.beta": value})
    assert err.value.key == "quantizer.beta"
    with pytest.raises(ConfigError, match="finite") as err:
        vqlab.quantizers.build("vq", beta=value)
    assert err.value.key == "beta"
    with pytest.raises(ConfigError, match="finite") as err:
        load("smoke", ["optim.lr=.inf"])  # YAML's spelling on the command line
    assert err.value.key == "optim.lr"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("tracking.experiment=..", "tracking.experiment"),
        ("tracking.experiment=.", "tracking.experiment"),
        ("tracking.experiment=", "tracking.experiment"),
        ("tracking.experiment=a\\b", "tracking.experiment"),
        ("tracking.experiment=a/b", "tracking.experiment"),
        ("tracking.run_name=..", "tracking.run_name"),
        ("tracking.run_name=.", "tracking.run_name"),
        ("tracking.run_name=..\\..", "tracking.run_name"),
        ("tracking.run_name=a/b", "tracking.run_name"),
        ("tracking.run_group=..", "tracking.run_group"),
        ("tracking.run_group=a/b", "tracking.run_group"),
    ],
)
def test_run_folder_names_that_leave_the_tracking_root_are_refused(override, key):
    with pytest.raises(ConfigError) as err:
        load("smoke", [override])
    assert err.value.key == key
    assert str(err.value).startswith(key)


def test_a_name_that_resolves_outside_the_tracking_root_is_refused(tmp_path):
    root, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "out").symlink_to(elsewhere)
    (root / "E").mkdir()
    (root / "E" / "out").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=r"^tracking\.experiment: .*outside"):
        load("smoke", {"tracking.root": str(root), "tracking.experiment": "out"})
    with pytest.raises(ConfigError, match=r"^tracking\.run_name: .*outside"):
        load("smoke", {"tracking.root": str(root), "tracking.experiment": "E", "tracking.run_name": "out"})
    named = load("smoke", {"tracking.root": str(root), "tracking.experiment": "E", "tracking.run_name": "..a..b"})
    assert named.tracking.run_name == "..a..b"  # dots inside a name are only a name
    (root / "F" / "x").mkdir(parents=True)
    (root / "E" / "latest").symlink_to(root / "F" / "x")  # a link that stays inside the root is a folder there
    linked = load("smoke", {"tracking.root": str(root), "tracking.experiment": "E", "tracking.run_name": "latest"})
    assert linked.tracking.run_name == "latest"
    (root / "E" / "up").symlink_to(root)
    with pytest.raises(ConfigError, match=r"^tracking\.run_name: "):
        load("smoke", {"tracking.root": str(root), "tracking.experiment": "E", "tracking.run_name": "up"})


def test_a_run_group_is_a_folder_between_the_experiment_and_the_run(tmp_path):
    from vqlab.runfolder import RunFolder
    from vqlab.tracking import run_label

    names = {"tracking.root": str(tmp_path / "runs"), "tracking.experiment": "E", "tracking.run_name": "seed0"}
    grouped = load("smoke", {**names, "tracking.run_group": "v"})
    run = RunFolder.of(grouped)
    assert run.path == tmp_path / "runs" / "E" / "v" / "seed0"
    assert run_label(grouped.tracking, run.name) == "v/seed0"  # its MLflow run name
    run.write_config(grouped)
    assert run.root == (tmp_path / "runs").resolve()
    plain = load("smoke", names)
    assert RunFolder.of(plain).path == tmp_path / "runs" / "E" / "seed0"
    assert run_label(plain.tracking, "seed0") == "seed0"
    (tmp_path / "runs" / "E").mkdir(exist_ok=True)
    (tmp_path / "runs" / "E" / "up").symlink_to(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"^tracking\.run_group: .*outside"):
        load("smoke", {**names, "tracking.run_group": "up", "tracking.run_name": "E"})


def test_the_command_line_writes_nothing_above_the_tracking_root(tmp_path, capsys):
    from vqlab.trainer import main

    root = tmp_path / "a" / "runs"
    root.mkdir(parents=True)
    kept = tmp_path / "metrics.jsonl"
    kept.write_text("keep\n")
    argv = [
        "--config",
        "smoke",
        f"tracking.root={root}",
        "tracking.mlflow=false",
        "train.steps=2",
        "optim.warmup_steps=0",
    ]
    assert main([*argv, "tracking.experiment=..", "tracking.run_name=.."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tracking.experiment: ") and err.count("\n") == 1
    assert kept.read_text() == "keep\n" and list(root.iterdir()) == []


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# train:\n#   steps: 5\n", "---\n"], ids=["empty", "blank", "comments", "no doc"]
)
def test_an_empty_config_file_is_an_error_not_the_default_config(tmp_path, text, capsys):
    from vqlab.trainer import main

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path} holds no settings"):
        load(str(path))
    assert main(["--config", str(path), f"tracking.root={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} holds no settings") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
