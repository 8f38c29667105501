"""The EMA codebook against the VQ-VAE-2 / Sonnet update, computed by hand."""

import pytest
import torch

import vqlab

CODEBOOK = [[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]


def ema_quantizer(**options):
    # the codebook is set by hand: no k-means init or re-seeding unless the test asks
    q = vqlab.quantizers.build("vq_ema", codebook_size=3, dim=2, **{"init": "uniform", "dead_code_steps": 0, **options})
    with torch.no_grad():
        q.embedding.copy_(torch.tensor(CODEBOOK))
        q.embed_sum.copy_(q.embedding * q.usage.ema[:, None])
    return q


def test_one_update_is_the_laplace_smoothed_formula():
    decay, eps = 0.9, 0.01
    q = ema_quantizer(decay=decay, eps=eps, beta=0.5)
    z = torch.tensor([[[0.5, 0.5], [-0.5, 1.0], [3.0, 1.0]]])  # two tokens on code 0, one on code 1
    out = q(z)
    assert out.codes[0, :, 0].tolist() == [0, 0, 1]
    assert set(out.losses) == {"commitment"}
    assert out.losses["commitment"].item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.25 + 1 + 1 + 1) / 6)
    assert q.embedding.tolist() == CODEBOOK  # forward only accumulates
    q.on_optimizer_step()

    counts, sums = [2, 1, 0], [[0.0, 1.5], [3.0, 1.0], [0.0, 0.0]]
    n = [decay * 1 + (1 - decay) * c for c in counts]
    m = [
        [decay * e + (1 - decay) * s for e, s in zip(row, total, strict=True)]
        for row, total in zip(CODEBOOK, sums, strict=True)
    ]
    smoothed = [(n_k + eps) / (sum(n) + 3 * eps) * sum(n) for n_k in n]
    expected = [[m_kd / s for m_kd in m_k] for m_k, s in zip(m, smoothed, strict=True)]
    torch.testing.assert_close(q.usage.ema, torch.tensor(n))
    torch.testing.assert_close(q.embed_sum, torch.tensor(m))
    torch.testing.assert_close(q.embedding, torch.tensor(expected))


def test_unused_code_is_not_blown_up_by_its_count():
    q = ema_quantizer()
    for _ in range(3):
        q(torch.tensor([[[0.1, 0.1], [3.9, 0.1]]]))
        q.on_optimizer_step()
    # code 2 was never used: its count decays with its sum, so it stays (almost) where it started
    torch.testing.assert_close(q.embedding[2], torch.tensor([0.0, 4.0]), rtol=1e-4, atol=0)


def test_eval_accumulates_nothing():
    q = ema_quantizer()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    q(torch.randn(2, 5, 2))
    q.on_optimizer_step()
    for key, value in q.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_codes_whose_usage_ema_falls_below_the_threshold_are_reseeded():
    q = ema_quantizer(decay=0.5, dead_code_threshold=0.5)
    z = torch.tensor([[[0.5, 0.0], [-0.5, 0.0], [4.5, 0.0], [3.5, 0.5]]])
    q(z)
    q.on_optimizer_step()  # code 2's count: 1 -> 0.5, not yet below 0.5
    torch.testing.assert_close(q.embedding[2], torch.tensor([0.0, 4.0]), rtol=1e-4, atol=0)
    q(z)
    q.on_optimizer_step()  # 0.5 -> 0.25
    assert (q.embedding[2] == z[0]).all(-1).any()
    assert q.usage.ema[2] == 1.0  # restarts at the initial count
    torch.testing.assert_close(q.embed_sum[2], q.embedding[2])
    assert q.usage.replaced == 1


def test_a_rejected_non_finite_step_leaves_the_codebook_alone():
    q = ema_quantizer(init="kmeans").hooks_driven_by_caller()
    z = torch.tensor([[[0.5, 0.5], [-0.5, 1.0], [3.0, 1.0], [0.0, 4.0]]])
    q(z)
    q.on_optimizer_step()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    poisoned = z.clone()
    poisoned[0, 1, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"VQEMA\.forward: the input tokens contain NaN or inf"):
        q(poisoned)
    q.on_optimizer_step()  # nothing of the rejected forward was gathered
    q.eval()
    for key, value in q.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_kmeans_init_on_non_finite_latents_is_the_quantizer_error():
    q = vqlab.quantizers.build("vq_ema", codebook_size=4, dim=2, init="kmeans")
    z = torch.randn(1, 16, 2)
    z[0, 0, 1] = float("inf")
    with pytest.raises(RuntimeError, match=r"VQEMA\.forward: the input tokens contain NaN or inf"):
        q(z)
    assert not q.initialized
