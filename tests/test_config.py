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
    assert callable(vqlab.train)


def test_switching_a_nested_variant_starts_it_afresh():
    cfg = load("rvq", ["quantizer.base.name=vq", "quantizer.base.dim=8"])
    assert cfg.quantizer.base.name == "vq" and cfg.quantizer.base.dim == 8
    assert load("rvq", ["quantizer.base.levels=[5,5]"]).quantizer.base.levels == (5, 5)


def test_switching_data_source_keeps_the_data_section():
    cfg = load("smoke", ["data.name=shapes"])
    assert cfg.data.name == "shapes" and cfg.data.batch_size == load("smoke").data.batch_size


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
