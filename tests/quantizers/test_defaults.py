"""A quantizer built with no options learns: ``vq`` and ``vq_ema`` defaults in a plain training loop
use most of their codebook. Uniform init with no dead-code re-seeding (the old defaults) left a
handful of codes winning every token: 3.5% of 1024 codes for ``vq_ema`` and 2 of 1024 for ``vq``
on the photos."""

import pytest
import torch

import vqlab

CLUSTERS, DIM, TOKENS = 64, 16, 512


def clustered_tokens(generator: torch.Generator, centres: torch.Tensor) -> torch.Tensor:
    """(1, TOKENS, DIM): tight clusters away from the origin, where a unit-variance init is not."""
    which = torch.randint(CLUSTERS, (TOKENS,), generator=generator)
    return (centres[which] + 0.05 * torch.randn(TOKENS, DIM, generator=generator))[None]


@pytest.mark.parametrize("name", ["vq", "vq_ema"])
def test_the_defaults_use_most_of_the_codebook_in_a_plain_loop(name):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    centres = 4.0 + torch.randn(CLUSTERS, DIM, generator=generator)
    encoder, decoder = torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM)
    q = vqlab.quantizers.build(name, codebook_size=CLUSTERS, dim=DIM).hooks_driven_by_caller()
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters(), *q.parameters()], lr=1e-3)
    for _ in range(300):
        x = clustered_tokens(generator, centres)
        out = q(encoder(x))
        loss = (decoder(out.z_q) - x).square().mean() + sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        q.on_optimizer_step()
    q.eval()
    with torch.no_grad():
        codes = q(encoder(clustered_tokens(generator, centres))).codes
    assert codes.unique().numel() / CLUSTERS >= 0.8
