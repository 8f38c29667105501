"""Every registered backbone through VQAutoencoder: shapes, gradients, training, compile, config checks."""

import pytest
import torch

import vqlab
from vqlab.models import BackboneConfig, build_autoencoder, build_backbone
from vqlab.schema import ConfigError, parse, to_dict

from ..helpers import metric_at

# Tiny widths so that a forward pass takes milliseconds and a smoke run a few seconds.
TINY_VIT = {"name": "vit", "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "mlp_ratio": 2}
TINY = {
    "conv": {"name": "conv", "width": 32, "channels": 32},
    "resnet": {"name": "resnet", "width": 8, "multipliers": [1, 1, 2], "groups": 4, "channels": 16},
    "vit": TINY_VIT,
    "vit_linear": {**TINY_VIT, "attention": "linear"},
}
# Every registered backbone (a new one without a tiny config fails with a KeyError in tiny()),
# plus options that change a backbone's computation enough to test on their own.
BACKBONES = [*vqlab.models.available(), "vit_linear"]


def tiny(name: str, **options) -> BackboneConfig:
    return parse(BackboneConfig, {**TINY[name], **options})


def fsq():
    return vqlab.quantizers.build("fsq", levels=[8, 5, 5, 5])


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", BACKBONES)
def test_shapes_tokens_and_gradient_to_the_first_layer(name, size):
    torch.manual_seed(0)
    cfg = tiny(name)
    model = build_autoencoder(cfg, fsq())
    x = images(size)
    grid = size // cfg.downsample
    assert model.encoder(x).shape == (2, model.pre_quant.in_features, grid, grid)
    z, _ = model.tokens(x)
    assert z.shape == (2, grid * grid, 4)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    (out.reconstruction - x).abs().mean().backward()
    first = next(model.encoder.parameters())
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", BACKBONES)
def test_every_quantizer_fits(name):
    x = images(32)
    for quantizer in vqlab.quantizers.available():
        torch.manual_seed(0)
        model = build_autoencoder(tiny(name), vqlab.quantizers.build(quantizer))
        out = model(x)
        assert out.reconstruction.shape == x.shape, quantizer
        (out.reconstruction.abs().mean() + sum(out.quant.losses.values(), torch.tensor(0.0))).backward()
        assert torch.isfinite(next(model.encoder.parameters()).grad).all(), quantizer


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", BACKBONES)
def test_smoke_run_lowers_val_l1(smoke_cfg, name, size):
    steps = 30 if size == 32 else 20
    cfg = smoke_cfg(
        **{f"model.{key}": value for key, value in TINY[name].items()},
        **{"data.image_size": size, "data.batch_size": 8, "data.val_count": 32},
        **{"train.steps": steps, "train.log_every": steps, "eval.metrics": ["reconstruction"]},
    )
    result = vqlab.trainer.fit(cfg)
    assert result.metrics["val/l1"] < 0.8 * metric_at(result.run_dir, "val/l1", 0)


def test_bf16_autocast_is_finite():
    x = images(32)
    for name in BACKBONES:
        torch.manual_seed(0)
        model = build_autoencoder(tiny(name), fsq())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.reconstruction.float().abs().mean().backward()
        assert torch.isfinite(out.reconstruction).all(), name
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), name


def compiled_matches_eager(name: str, backward: bool) -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    backbone = build_backbone(tiny(name))
    model = torch.nn.Sequential(backbone.encoder, backbone.decoder)
    x = images(32)
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
    if backward:
        out.abs().mean().backward()
        assert next(model.parameters()).grad.abs().sum() > 0


def test_compile_runs_on_cpu():
    compiled_matches_eager("vit", backward=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_compile_forward_and_backward_on_cpu(name):
    compiled_matches_eager(name, backward=True)


def test_resnet_factor_is_configurable():
    cfg = tiny("resnet", multipliers=[1, 1, 2, 2], factor=4)
    assert cfg.downsample == 4 and tiny("resnet", multipliers=[1, 1, 2, 2]).downsample == 8
    model = build_autoencoder(cfg, fsq())
    x = images(32)
    assert model.encoder(x).shape[-2:] == (8, 8)
    assert model(x).reconstruction.shape == x.shape


def test_conv_blocks_add_residual_blocks_at_the_latent_resolution_on_both_sides():
    plain, deep = build_autoencoder(tiny("conv"), fsq()), build_autoencoder(tiny("conv", blocks=2), fsq())
    w = TINY["conv"]["width"]
    per_block = (9 * w * w + w) + (w * w + w)  # a 3x3 and a 1x1 convolution with biases

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(deep) - count(plain) == 2 * 2 * per_block
    x = images(32)
    out = deep(x)
    assert out.reconstruction.shape == x.shape and out.latents.shape[-2:] == plain(x).latents.shape[-2:]
    out.reconstruction.abs().mean().backward()
    blocks = [m for m in deep.modules() if type(m).__name__ == "ResidualBlock"]
    assert len(blocks) == 4 and all(p.grad.abs().sum() > 0 for b in blocks for p in b.parameters())


def test_conv_nearest_upsampling_doubles_by_repeating_then_convolves():
    model = build_autoencoder(tiny("conv", upsample="nearest"), fsq())
    kinds = [type(m).__name__ for m in model.decoder.modules()]
    assert "ConvTranspose2d" not in kinds and kinds.count("Upsample") == 3
    x = images(32)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    # the output layer is the last 3x3 convolution, where the adversarial weight reads its gradient
    assert model.last_layer() is model.decoder[-1][1].weight and model.last_layer().shape[-2:] == (3, 3)
    out.reconstruction.abs().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_last_layer_is_the_decoder_output():
    assert build_autoencoder(tiny("resnet"), fsq()).last_layer().shape == (3, 8, 3, 3)
    assert build_autoencoder(tiny("vit"), fsq()).last_layer().shape == (3 * 8 * 8, 32)


def test_learned_positions_fit_one_image_size():
    cfg = tiny("vit", position="learned", image_size=32)
    model = build_autoencoder(cfg, fsq())
    assert model(images(32)).reconstruction.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"made for 32x32 images, got 64x64.*model\.image_size"):
        model(images(64))


@pytest.mark.parametrize("name", BACKBONES)
def test_indivisible_images_are_refused_naming_the_factor(name):
    model = build_autoencoder(tiny(name), fsq())
    with pytest.raises(ValueError, match=r"divisible by the backbone's downsampling factor"):
        model(images(34))
    with pytest.raises(ConfigError) as err:
        vqlab.config.load("smoke", {**{f"model.{k}": v for k, v in TINY[name].items()}, "data.image_size": 34})
    assert err.value.key == "data.image_size" and "downsampling factor" in str(err.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"name": "resnet", "groups": 3}, "groups"),
        ({"name": "resnet", "multipliers": []}, "multipliers"),
        ({"name": "resnet", "factor": 3}, "factor"),
        ({"name": "resnet", "factor": 16}, "factor"),
        ({"name": "conv", "blocks": -1}, "blocks"),
        ({"name": "conv", "upsample": "bilinear"}, "upsample"),
        ({"name": "vit", "width": 30}, "width"),
        ({"name": "vit", "heads": 3}, "width"),
        ({"name": "vit", "attention": "performer"}, "attention"),
        ({"name": "vit", "position": "learned"}, "image_size"),
        ({"name": "vit", "position": "learned", "image_size": 36}, "image_size"),
        ({"name": "vit", "image_size": 32}, "image_size"),
    ],
)
def test_bad_options_name_their_key(options, key):
    with pytest.raises(ConfigError) as err:
        vqlab.config.load("smoke", {f"model.{k}": v for k, v in options.items()})
    assert err.value.key == f"model.{key}"


def test_presets_change_only_the_model():
    default = to_dict(vqlab.config.load("default"))
    for preset, name in [("resnet_fsq", "resnet"), ("vit_fsq", "vit"), ("vit_linear_fsq", "vit")]:
        cfg = to_dict(vqlab.config.load(preset))
        assert cfg["model"]["name"] == name and cfg["tracking"]["experiment"] == preset
        cfg["tracking"]["experiment"] = default["tracking"]["experiment"]
        assert {k: v for k, v in cfg.items() if k != "model"} == {k: v for k, v in default.items() if k != "model"}
    softmax, linear = to_dict(vqlab.config.load("vit_fsq")), to_dict(vqlab.config.load("vit_linear_fsq"))
    assert {k for k in softmax["model"] if softmax["model"][k] != linear["model"][k]} == {"attention"}
