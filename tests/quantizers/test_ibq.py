"""IBQ against a dense autograd reference of its formula: the chosen code, the double quantization
loss, and a gradient that reaches every code, computed in blocks of codes."""

import pytest
import torch

import vqlab
from vqlab.quantizers.ibq import IBQ, IBQConfig, IndexBackprop

from .helpers import dense_entropies


def dense(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's straight-through one-hot over the softmax of every score, as written."""
    p = torch.softmax(z @ codebook.T, dim=-1)  # (M, K)
    index = p.argmax(-1)
    hard = torch.nn.functional.one_hot(index, codebook.shape[0]).to(z.dtype)
    return (hard - p.detach() + p) @ codebook, index


@pytest.mark.parametrize("elements", [40, 1000, 10**8])  # one code per block, several, all at once
def test_blocked_forward_and_backward_equal_the_dense_formula(elements):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(40, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(50, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    expected, expected_index = dense(z, codebook)
    (expected * upstream).sum().backward()
    dense_grads = z.grad.clone(), codebook.grad.clone()
    z.grad = codebook.grad = None
    value, index = IndexBackprop.apply(z, codebook, elements)
    (value * upstream).sum().backward()
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(z.grad, dense_grads[0])
    torch.testing.assert_close(codebook.grad, dense_grads[1])


def test_the_entropy_loss_is_per_token_minus_codebook_entropy_times_its_weight():
    q = vqlab.quantizers.build(
        "ibq", codebook_size=32, dim=4, init="normal", entropy_weight=0.3, entropy_temperature=0.5
    )
    z = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(3))
    per_token, spread = dense_entropies(z.reshape(-1, 4), q.embedding.detach(), 0.5)
    torch.testing.assert_close(q(z).losses["entropy"], 0.3 * (per_token - spread))
    assert "entropy" not in vqlab.quantizers.build("ibq", entropy_weight=0.0)(torch.randn(1, 4, 32)).losses


def test_the_code_is_the_largest_score_not_the_nearest():
    q = vqlab.quantizers.build("ibq", codebook_size=2, dim=2)
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    z = torch.tensor([[[1.0, 0.0]]])  # nearest is code 0, largest score z·c is code 1
    assert q(z).codes.item() == 1 and q.encode(z).item() == 1


def test_the_double_quantization_loss_and_a_gradient_for_every_code():
    q = vqlab.quantizers.build("ibq", codebook_size=64, dim=4, beta=0.5, init="normal", entropy_weight=0.0)
    z = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(1))  # 16 tokens, at most 16 codes chosen
    out = q(z)
    chosen = q.embedding[out.codes[..., 0]].detach()
    torch.testing.assert_close(out.losses["index"], (chosen - z).square().mean())
    torch.testing.assert_close(out.losses["commitment"], (chosen - z).square().mean())
    torch.testing.assert_close(out.losses["codebook"], 0.5 * (chosen - z).square().mean())
    assert out.codes.unique().numel() <= 16
    out.losses["index"].backward()
    assert (q.embedding.grad.norm(dim=-1) > 0).all()  # all 64 codes learn, chosen or not


def test_scores_are_held_one_block_at_a_time():
    """With a budget of 8 scores and 4 tokens, the forward and backward see blocks of 2 codes."""
    seen = []
    original = torch.Tensor.__matmul__

    def recording(a, b):
        result = original(a, b)
        if result.ndim == 2 and result.shape[0] == 4 and b.shape[0] == 3:
            seen.append(result.shape[1])
        return result

    q = IBQ(IBQConfig(codebook_size=7, dim=3), elements=8)
    z = torch.randn(1, 4, 3, requires_grad=True)
    torch.Tensor.__matmul__ = recording
    try:
        sum(q(z).losses.values()).backward()
    finally:
        torch.Tensor.__matmul__ = original
    assert seen and max(seen) <= 2


def test_by_default_the_blocks_are_the_devices(monkeypatch):
    """Scores, entropies and both backwards walk blocks of ``block_elements`` of the device."""
    from vqlab import cluster
    from vqlab.quantizers import _softmax, ibq

    budgets = []
    real = _softmax.code_blocks

    def recording(tokens, codes, elements):
        budgets.append(elements)
        return real(tokens, codes, elements)

    monkeypatch.setattr(ibq, "code_blocks", recording)
    monkeypatch.setattr(_softmax, "code_blocks", recording)
    q = vqlab.quantizers.build("ibq", codebook_size=16, dim=4)
    z = torch.randn(2, 8, 4, requires_grad=True)
    out = q(z)
    (out.z_q.sum() + sum(out.losses.values())).backward()
    assert len(budgets) == 4 and set(budgets) == {cluster.block_elements(torch.device("cpu"))}
    assert cluster.block_elements(torch.device("cpu")) == cluster.CPU_CHUNK_ELEMENTS


@pytest.mark.parametrize(
    ("key", "value"),
    [("init", "kmeans"), ("codebook_size", 1), ("beta", -1.0), ("entropy_weight", -0.1), ("entropy_temperature", 0.0)],
)
def test_bad_options_are_config_errors_naming_the_key(key, value):
    from vqlab.schema import ConfigError

    with pytest.raises(ConfigError, match=key):
        vqlab.quantizers.build("ibq", **{key: value})
