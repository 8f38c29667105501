"""Identity: the continuous baseline passes tokens through and has no codes."""

import pytest
import torch

import vqlab
from vqlab.schema import ConfigError


def test_z_q_is_z_with_the_identity_gradient():
    q = vqlab.quantizers.build("identity", dim=5)
    z = torch.randn(2, 7, 5, requires_grad=True)
    out = q(z)
    assert torch.equal(out.z_q, z) and out.losses == {} and out.stats == {}
    upstream = torch.randn(2, 7, 5)
    (out.z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    low = torch.randn(2, 7, 5).bfloat16()
    assert torch.equal(q(low).z_q, low) and q(low).z_q.dtype == torch.bfloat16


def test_codes_are_empty_and_decode_raises():
    q = vqlab.quantizers.build("identity", dim=5)
    z = torch.randn(2, 7, 5)
    for codes in (q(z).codes, q.encode(z)):
        assert codes.shape == (2, 7, 0) and codes.dtype == torch.int64
    assert q.radices == () and not q.discrete
    with pytest.raises(ValueError, match="no codes"):
        q.decode(torch.zeros(2, 7, 0, dtype=torch.int64))


def test_bad_dim_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        vqlab.quantizers.build("identity", dim=0)
    assert err.value.key == "dim"


def test_preset_loads():
    cfg = vqlab.config.load("identity")
    assert vqlab.quantizers.build(cfg.quantizer).dim == 4
    assert vqlab.config.from_yaml(vqlab.config.to_yaml(cfg)) == cfg
