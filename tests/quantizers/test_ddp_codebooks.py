"""Two gloo ranks with different data train a tiny model through DDP; every quantizer buffer,
codebook included, must end bit-identical on both (k-means init, EMA statistics, dead codes),
whether the loop drives the optimizer-step hook or the quantizer drives itself."""

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import vqlab

from ..helpers import spawn_ranks

WORLD = 2
STEPS = 4
ACCUMULATE = 2
VQ_EMA = {"codebook_size": 32, "dim": 4, "init": "kmeans", "dead_code_steps": 2, "dead_code_threshold": 0.3}
# case -> (quantizer, options, whether the loop drives the hook; otherwise the quantizer drives itself)
CASES = {
    "vq_ema": ("vq_ema", VQ_EMA, True),
    "vq": (
        "vq",
        {"codebook_size": 32, "dim": 4, "dead_code_steps": 2, "estimator": "rotation", "entropy_weight": 0.1},
        True,
    ),
    "vq_ema_self_driven": ("vq_ema", VQ_EMA, False),
    # 64 latents per forward over both ranks: k-means waits for the second forward's (and no
    # dead-code re-seeding, which may draw the same latent twice, blurs what the init left)
    "vq_ema_kmeans_over_forwards": (
        "vq_ema",
        {**VQ_EMA, "codebook_size": 100, "dead_code_steps": 0, "dead_code_threshold": 0.0},
        True,
    ),
}


class Tiny(nn.Module):
    def __init__(self, quantizer):
        super().__init__()
        self.encoder = nn.Linear(6, quantizer.dim)
        self.quantizer = quantizer
        self.decoder = nn.Linear(quantizer.dim, 6)

    def forward(self, x):
        out = self.quantizer(self.encoder(x))
        return self.decoder(out.z_q), sum(out.losses.values())


def train_rank(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    for case, (name, options, drives_hooks) in CASES.items():
        torch.manual_seed(rank)  # ranks start from different codebooks: the quantizer must agree anyway
        quantizer = vqlab.quantizers.build(name, **options)
        if drives_hooks:
            quantizer.hooks_driven_by_caller()
        model = DistributedDataParallel(Tiny(quantizer), broadcast_buffers=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(100 + rank)
        for _ in range(STEPS):
            optimizer.zero_grad()
            for micro in range(ACCUMULATE):
                x = torch.randn(4, 8, 6, generator=data) * (1 + rank)
                with model.no_sync() if micro < ACCUMULATE - 1 else nullcontext():
                    reconstruction, quant_loss = model(x)
                    ((reconstruction - x).square().mean() + quant_loss).backward()
            optimizer.step()
            if drives_hooks:
                quantizer.on_optimizer_step()
        torch.save(quantizer.state_dict(), out_dir / f"{case}-{rank}.pt")


def test_codebooks_are_bit_identical_across_ranks(tmp_path):
    spawn_ranks(train_rank, (tmp_path / "init", tmp_path), WORLD)
    for case, (_, _, drives_hooks) in CASES.items():
        states = [torch.load(tmp_path / f"{case}-{rank}.pt") for rank in range(WORLD)]
        assert states[0].keys() == states[1].keys()
        for key in states[0]:
            assert torch.equal(states[0][key], states[1][key]), (case, key)
        # self-driven: every training forward but the first applies the previous one's statistics
        updates = STEPS if drives_hooks else STEPS * ACCUMULATE - 1
        assert states[0]["initialized"] and states[0]["usage.steps"] == updates, case
        codebook = states[0]["embedding"]
        if case == "vq_ema_kmeans_over_forwards":
            assert torch.pdist(codebook).min() > 1e-3  # no (nearly) duplicate codes from the init
        else:
            assert states[0]["usage.replaced"] > 0, case  # dead-code re-seeding ran
