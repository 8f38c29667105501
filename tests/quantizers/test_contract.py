"""The QuantizerOutput contract (README, "Quantizers"), checked for every registered quantizer."""

import pytest
import torch

import vqlab
from vqlab.codes import digits_to_index, index_to_digits

from .helpers import tokens

NAMES = vqlab.quantizers.available()


@pytest.fixture(params=NAMES)
def quantizer(request):
    torch.manual_seed(0)
    # the tests compare several forwards of one state: a driver that has not stepped yet
    return vqlab.quantizers.build(request.param).hooks_driven_by_caller()


def test_output_contract(quantizer):
    z = tokens(quantizer, batch=4, n=16)
    out = quantizer(z)
    assert isinstance(out, vqlab.quantizers.QuantizerOutput)
    assert out.z_q.shape == z.shape and out.z_q.dtype == z.dtype
    assert out.codes.shape == (*z.shape[:2], len(quantizer.radices)) and out.codes.dtype == torch.int64
    radices = torch.tensor(quantizer.radices)
    assert (out.codes >= 0).all() and (out.codes < radices).all()
    assert quantizer.codebook_size == int(radices.prod())
    for name, loss in out.losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), name
    for name, stat in out.stats.items():
        assert not stat.requires_grad, name
    if quantizer.discrete:  # a continuous quantizer has no codes to count
        assert 1 <= out.stats["perplexity"] <= out.stats["distinct_codes"] + 1e-4
        assert out.stats["distinct_codes"] == len({tuple(c) for c in out.codes.reshape(-1, len(radices)).tolist()})


def test_gradient_reaches_the_input(quantizer):
    z = tokens(quantizer, batch=4, n=16).requires_grad_()
    out = quantizer(z)
    (out.z_q.square().sum() + sum(out.losses.values(), torch.tensor(0.0))).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_decode_of_encode_is_z_q_in_eval(quantizer):
    if not quantizer.discrete:
        pytest.skip("a continuous quantizer has no codes to decode")
    quantizer.eval()
    z = tokens(quantizer, batch=4, n=16)
    out = quantizer(z)
    assert torch.equal(quantizer.encode(z), out.codes)
    assert torch.equal(quantizer.decode(out.codes), out.z_q)
    # any leading shape, and flat indices round-trip through the one index helper
    flat = digits_to_index(out.codes, quantizer.radices)
    assert torch.equal(quantizer.decode(index_to_digits(flat, quantizer.radices)[0, :5]), out.z_q[0, :5])


def test_bf16_autocast_gives_the_fp32_codes(quantizer):
    z = tokens(quantizer, seed=3, batch=4, n=16)
    reference = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = quantizer(z)
    assert torch.equal(autocast.codes, reference.codes)
    assert autocast.z_q.dtype == torch.float32
    low = quantizer(z.bfloat16())
    assert low.z_q.dtype == torch.bfloat16
    assert torch.equal(low.codes, quantizer(z.bfloat16().float()).codes)


def test_decode_rejects_digits_outside_their_radix(quantizer):
    if not quantizer.discrete:
        pytest.skip("a continuous quantizer has no codes to decode")
    valid = torch.zeros(3, len(quantizer.radices), dtype=torch.long)
    name = type(quantizer).__name__
    for column, radix in enumerate(quantizer.radices):
        for digit in (radix, -1):
            codes = valid.clone()
            codes[1, column] = digit
            with pytest.raises(RuntimeError, match=rf"{name}\.decode: a digit is outside \[0, radix\)"):
                quantizer.decode(codes)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tokens_are_an_error_naming_the_quantizer(quantizer, bad):
    z = tokens(quantizer)
    z[1, 3, 0] = bad
    name = type(quantizer).__name__
    for method, call in [("forward", quantizer.train()), ("forward", quantizer.eval()), ("encode", quantizer.encode)]:
        with pytest.raises(RuntimeError, match=rf"{name}\.{method}: the input tokens contain NaN or inf"):
            call(z)


def test_rejects_wrong_token_shape(quantizer):
    with pytest.raises(ValueError, match="tokens"):
        quantizer(torch.randn(2, 3, quantizer.dim + 1))
    with pytest.raises(ValueError, match="codes"):
        quantizer.decode(torch.zeros(2, 3, len(quantizer.radices) + 1, dtype=torch.long))


def test_a_training_step_reads_nothing_on_the_host_once_initialised(quantizer, no_host_reads):
    """Forward, backward and the optimizer-step hook, after the first step (k-means init may read
    the pool size while it gathers): nothing in them waits for the device."""
    quantizer.train()
    z = tokens(quantizer, batch=4, n=300).requires_grad_()
    for _ in range(2):
        out = quantizer(z)
        (out.z_q.sum() + sum(out.losses.values())).backward()
        quantizer.on_optimizer_step()
    no_host_reads()
    out = quantizer(z)
    (out.z_q.sum() + sum(out.losses.values())).backward()
    quantizer.on_optimizer_step()


def test_a_training_forward_compiles_into_one_graph_once_initialised(quantizer):
    """torch.compile traces the forward without a graph break (each break splits the compiled
    step and returns to Python)."""
    quantizer.train()
    z = tokens(quantizer, batch=4, n=300)
    for _ in range(2):
        quantizer(z)
        quantizer.on_optimizer_step()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(quantizer)(z)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1
