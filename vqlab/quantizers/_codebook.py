"""Machinery shared by the learned-codebook quantizers (``vq`` and ``vq_ema``).

Neural Discrete Representation Learning (van den Oord et al., 2017), https://arxiv.org/abs/1711.00937,
with the options later work added: low-dimensional and l2-normalised lookup (Vector-quantized Image
Modeling with Improved VQGAN, Yu et al., 2021, https://arxiv.org/abs/2110.04627), k-means
initialisation and dead-code re-seeding (Jukebox, Dhariwal et al., 2020, https://arxiv.org/abs/2005.00341),
and the rotation trick (Restructuring Vector Quantization with the Rotation Trick, Fifty et al., 2024,
https://arxiv.org/abs/2410.06424).

State follows the quantizer hook contract: a training forward only accumulates this optimizer step's
statistics into window buffers; ``on_optimizer_step`` all-reduces them in place, updates the
running state once and clears the window. Every collective here runs on every rank in the same
order; branches around them depend only on the config or on values that are identical on every
rank (all-reduced or gathered), never on the rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqlab import distributed
from vqlab.cluster import kmeans, nearest
from vqlab.quantizers.base import Quantizer, QuantizerConfig, QuantizerOutput, straight_through
from vqlab.schema import require

INITIAL_COUNT = 1.0  # every code starts as if it had been used once per step: no tiny EMA denominators
INITS = ("uniform", "normal", "kmeans")
ESTIMATORS = ("ste", "rotation")


@dataclass(frozen=True)
class CodebookConfig(QuantizerConfig):
    """Options shared by ``vq`` and ``vq_ema``.

    codebook_dim:        0 looks codes up in the input width ``dim``; otherwise latents are projected
                         to this width for the lookup and back (low-dimensional lookup)
    cosine:              l2-normalise latents and codes before the lookup
    init:                ``uniform`` U(-sqrt(3), sqrt(3)) and ``normal`` N(0, 1) (both unit variance per
                         channel), or ``kmeans`` on the first training latents of every rank, gathered
                         over as many forwards as it takes to have at least ``codebook_size`` of them
    dead_code_steps:     re-seed codes unused for this many optimizer steps (0: off); with about one
                         token per code per step (1024 codes, 1024 tokens) 10 beat 100 on the photos
    dead_code_threshold: re-seed codes whose usage EMA (tokens per optimizer step, summed over ranks)
                         falls below this (0: off)
    estimator:           gradient to the latents: straight-through (``ste``) or the rotation trick
    """

    codebook_size: int = 1024
    dim: int = 64
    codebook_dim: int = 0
    beta: float = 0.25
    cosine: bool = False
    # Defaults that learn with no options (k-means init, re-seeding codes unused for 10 steps); the
    # old uniform init without re-seeding left a few codes winning every token (the sweep
    # ``codebook_usage`` and the README's "EMA VQ and LFQ usage" measure why).
    init: Literal["uniform", "normal", "kmeans"] = "kmeans"
    kmeans_iters: int = 10
    dead_code_steps: int = 10
    dead_code_threshold: float = 0.0
    estimator: Literal["ste", "rotation"] = "ste"

    def __post_init__(self):
        require(self.codebook_size >= 2, "codebook_size", f"must be >= 2, got {self.codebook_size}")
        require(self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")
        require(self.codebook_dim >= 0, "codebook_dim", f"must be >= 0 (0: same as dim), got {self.codebook_dim}")
        require(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        require(self.init in INITS, "init", f"must be one of {list(INITS)}, got {self.init!r}")
        require(self.kmeans_iters >= 1, "kmeans_iters", f"must be >= 1, got {self.kmeans_iters}")
        require(self.dead_code_steps >= 0, "dead_code_steps", f"must be >= 0 (0: off), got {self.dead_code_steps}")
        require(
            self.dead_code_threshold >= 0,
            "dead_code_threshold",
            f"must be >= 0 (0: off), got {self.dead_code_threshold}",
        )
        require(self.estimator in ESTIMATORS, "estimator", f"must be one of {list(ESTIMATORS)}, got {self.estimator!r}")

    @property
    def lookup_dim(self) -> int:
        return self.codebook_dim or self.dim

    @property
    def replaces_dead_codes(self) -> bool:
        return self.dead_code_steps > 0 or self.dead_code_threshold > 0


def initial_codebook(size: int, dim: int, init: str) -> torch.Tensor:
    """The codebook before the first training batch; ``kmeans`` replaces it then."""
    if init == "uniform":
        return torch.empty(size, dim).uniform_(-(3**0.5), 3**0.5)
    return torch.randn(size, dim)


def sample_rows(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` rows of ``x`` drawn with a generator seeded by ``seed`` (distinct rows when there are enough)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if x.shape[0] >= n:
        index = torch.randperm(x.shape[0], generator=generator, device=x.device)[:n]
    else:
        index = torch.randint(x.shape[0], (n,), generator=generator, device=x.device)
    return x[index]


def rotation_surrogate(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation trick (Fifty et al., 2024, Eq. 4): ``sg[λR] e`` with ``R = I - 2rrᵀ + 2q̂êᵀ``,
    ``r = (ê + q̂)/‖ê + q̂‖`` and ``λ = ‖q‖/‖e‖``. Its value is ``q`` up to rounding; the caller takes
    the value from ``q`` exactly and only the gradient ``λRᵀ ∂L/∂q`` from here."""
    e_detached = e.detach()
    e_norm = e_detached.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    e_hat = e_detached / e_norm
    q_hat = F.normalize(q, dim=-1)
    r = F.normalize(e_hat + q_hat, dim=-1)
    scale = q.norm(dim=-1, keepdim=True) / e_norm
    # R e without forming R: e - 2r(rᵀe) + 2q̂(êᵀe)
    rotated = e - 2 * r * (r * e).sum(-1, keepdim=True) + 2 * q_hat * (e_hat * e).sum(-1, keepdim=True)
    return scale * rotated


class LatentSpace(nn.Module):
    """Where codes are looked up: an optional projection to ``codebook_dim`` and back, and optional
    l2 normalisation of latents and codes."""

    def __init__(self, dim: int, codebook_dim: int, cosine: bool):
        super().__init__()
        self.cosine = cosine
        self.project_in = nn.Linear(dim, codebook_dim) if codebook_dim else None
        self.project_out = nn.Linear(codebook_dim, dim) if codebook_dim else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.cosine else x

    def latents(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., dim) -> (..., codebook_dim)``: what is compared with the codes."""
        return self.normalize(self.project_in(z) if self.project_in is not None else z)

    def lookup(self, codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``(K, d)`` codes and ``(...)`` indices -> ``(..., dim)``. The projection is applied to the
        ``K`` codes, never to the tokens, so decode and forward give bit-identical rows whatever
        the leading shape."""
        table = self.project_out(codebook) if self.project_out is not None else codebook  # (K, dim)
        return table[index]

    def attach(self, codebook: torch.Tensor, index: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
        """``z_q`` ``(..., dim)`` whose value is exactly ``lookup(codebook, index)`` and whose gradient
        reaches the latents as ``surrogate``'s (``(..., d)``), through the output projection."""
        value = self.lookup(codebook.detach(), index)  # (..., dim); projection weights still get gradient
        if self.project_out is None:
            return straight_through(surrogate, value)
        # A linear map of an exact zero is an exact zero: the value stays bit-identical to decode.
        return value + F.linear(surrogate - surrogate.detach(), self.project_out.weight)


class CodeUsage(nn.Module):
    """Per-code assignment counts: this optimizer step's window, their EMA over optimizer steps
    (starting at ``INITIAL_COUNT``) and the number of steps since each code was last used."""

    def __init__(self, size: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("window", torch.zeros(size), persistent=False)
        self.register_buffer("ema", torch.full((size,), INITIAL_COUNT))
        self.register_buffer("steps_unused", torch.zeros(size, dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("replaced", torch.zeros((), dtype=torch.int64))
        self._host_steps: int | None = None  # ``steps`` counted on the host once read (no sync per step)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_host_steps", None))

    def accumulate(self, index: torch.Tensor) -> None:
        # index_add_, not bincount: bincount sizes its output from the largest index, a device read
        self.window.index_add_(0, index, torch.ones_like(index, dtype=self.window.dtype))

    def step_count(self) -> int:
        """``steps`` as a Python int: read from the device once after construction or loading,
        then counted on the host, so that a step needs no host-device sync for it."""
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        return self._host_steps

    def restart_(self) -> None:
        """Forget the usage history: every code as if new (a codebook replaced as a whole)."""
        self.ema.fill_(INITIAL_COUNT)
        self.steps_unused.zero_()

    def update_(self) -> None:
        """Fold the (already all-reduced) window into the EMA and the unused-step counters."""
        self.ema.mul_(self.decay).add_(self.window, alpha=1 - self.decay)
        self.steps_unused.copy_(torch.where(self.window > 0, 0, self.steps_unused + 1))
        self.steps += 1
        if self._host_steps is not None:
            self._host_steps += 1

    def dead(self, max_unused_steps: int, threshold: float) -> torch.Tensor:
        """``(K,)`` bool: unused for ``max_unused_steps`` steps, or usage EMA below ``threshold`` (0: off)."""
        dead = torch.zeros_like(self.window, dtype=torch.bool)
        if max_unused_steps > 0:
            dead |= self.steps_unused >= max_unused_steps
        if threshold > 0:
            dead |= self.ema < threshold
        return dead

    def reset_(self, mask: torch.Tensor, count: float) -> None:
        self.ema.copy_(torch.where(mask, count, self.ema))
        self.steps_unused.copy_(torch.where(mask, 0, self.steps_unused))
        self.replaced += mask.sum()

    def effective_fraction(self) -> torch.Tensor:
        """exp(entropy) of the usage EMA over the codebook size: the smoothed fraction of codes in use."""
        p = self.ema / self.ema.sum()
        return torch.special.entr(p).sum().exp() / p.numel()


class CodebookQuantizer(Quantizer):
    """A flat codebook of ``K`` codes: nearest-code lookup in fp32, ``radices == (K,)``.

    Subclasses own ``embedding`` ``(K, d)``, the stored codes (a parameter or a buffer), and how it
    learns: ``codebook_losses``, and for statistics-driven updates ``accumulate``,
    ``window_buffers``, ``update_codebook_`` and ``write_codes_`` (initialisation and re-seeding).
    """

    cfg: CodebookConfig
    embedding: torch.Tensor

    def __init__(self, cfg: CodebookConfig, usage_decay: float):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.radices = (cfg.codebook_size,)
        self.space = LatentSpace(cfg.dim, cfg.codebook_dim, cfg.cosine)
        self.usage = CodeUsage(cfg.codebook_size, usage_decay)
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False  # ``initialized`` seen True on the host: never read again
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_known_initialized", False))
        self._latest: torch.Tensor | None = None  # this rank's last training latents: re-seeding candidates
        self._pending = False  # a training forward filled the window since the last on_optimizer_step
        self._window_filled = False  # the window holds statistics (init empties it mid-step)
        if cfg.init == "kmeans":
            # Every rank's latents gathered for k-means so far: buffers, so that a run resumed while
            # it is still gathering initialises as the uninterrupted run does (K x d floats).
            self.register_buffer("kmeans_pool", torch.zeros(cfg.codebook_size, cfg.lookup_dim))
            self.register_buffer("kmeans_pool_rows", torch.zeros((), dtype=torch.int64))

    # --- subclass interface ----------------------------------------------------------------------
    def codebook_losses(
        self, latents: torch.Tensor, quantized: torch.Tensor, codebook: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The losses of ``(B, N, d)`` latents against their ``quantized`` codes of ``codebook`` ``(K, d)``."""
        raise NotImplementedError

    def write_codes_(self, mask: torch.Tensor, vectors: torch.Tensor) -> None:
        """Set the codes where ``mask`` ``(K,)`` holds to the rows of ``vectors`` ``(K, d)``
        (``usage.ema`` is already reset for them)."""
        self.embedding.copy_(torch.where(mask[:, None], vectors, self.embedding))

    def accumulate(self, latents: torch.Tensor, index: torch.Tensor) -> None:
        """Add this forward's ``(M, d)`` latents assigned to ``(M,)`` codes to the window."""

    def window_buffers(self) -> list[torch.Tensor]:
        """Every per-window accumulator, all-reduced in this order and cleared each optimizer step."""
        return [self.usage.window]

    def update_codebook_(self) -> None:
        """Apply the window's all-reduced statistics, after ``usage`` has been updated."""

    # --- quantization ----------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """``(K, d)`` the codes as compared with latents (normalised in cosine mode)."""
        return self.space.normalize(self.embedding)

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        latents = self.space.latents(z)  # (B, N, d)
        flat = latents.reshape(-1, latents.shape[-1])  # (B*N, d)
        if self.training and not self._known_initialized:
            if bool(self.initialized):  # one device read per construction or load, not per step
                self._known_initialized = True
            else:
                self._initialize_(flat.detach())
        codebook = self.codebook()  # (K, d)
        index = nearest(flat.detach(), codebook.detach())  # (B*N,), never the (B*N, K) distances at once
        quantized = codebook[index].reshape(latents.shape)  # (B, N, d)
        if self.training:
            self._pending = self._window_filled = True
            self.usage.accumulate(index)
            self.accumulate(flat.detach(), index)
            if self.cfg.replaces_dead_codes:
                self._latest = flat.detach()
        index = index.reshape(latents.shape[:-1])  # (B, N)
        rotation = self.cfg.estimator == "rotation"
        surrogate = rotation_surrogate(latents, quantized.detach()) if rotation else latents  # (B, N, d)
        z_q = self.space.attach(codebook, index, surrogate)  # (B, N, D)
        stats = {"codebook_usage_ema": self.usage.effective_fraction()}
        if self.cfg.replaces_dead_codes:
            stats["codes_replaced"] = self.usage.replaced.float()
        return QuantizerOutput(
            z_q=z_q,
            codes=index[..., None],
            losses=self.codebook_losses(latents, quantized, codebook),
            stats=stats,
        )

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        """The latents as the codes are compared with them, mapped to the output space as a code is."""
        latents = self.space.latents(z.float())  # (B, N, d)
        return self.space.project_out(latents) if self.space.project_out is not None else latents

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        latents = self.space.latents(z)  # (B, N, d)
        index = nearest(latents.reshape(-1, latents.shape[-1]), self.codebook())  # (B*N,)
        return index.reshape(*latents.shape[:-1], 1)

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        return self.space.lookup(self.codebook(), codes[..., 0])  # (..., D)

    # --- state updates ---------------------------------------------------------------------------
    @torch.no_grad()
    def _initialize_(self, latents: torch.Tensor) -> None:
        """Training forwards until initialised. The first makes rank 0's initial codebook everyone's,
        so that ranks agree even when they were seeded differently. With ``kmeans`` init, every
        rank's latents are gathered, forward after forward, until there are at least K of them
        (fewer would leave duplicate, dead codes): meanwhile the initial codebook serves; then
        k-means on them replaces it and the statistics gathered with it are dropped. The pool is
        gathered, so its size, and every decision here, is the same on every rank."""
        everything = torch.ones_like(self.usage.window, dtype=torch.bool)
        if self.cfg.init != "kmeans" or int(self.kmeans_pool_rows) == 0:
            self.write_codes_(everything, distributed.broadcast_(self.embedding.detach().clone()))
        if self.cfg.init != "kmeans":
            self.initialized.fill_(True)
            self._known_initialized = True
            return
        rows = int(self.kmeans_pool_rows)
        pool = torch.cat([self.kmeans_pool[:rows], distributed.all_gather_cat(latents)])  # identical on every rank
        if pool.shape[0] < self.cfg.codebook_size:
            self.kmeans_pool[: pool.shape[0]] = pool
            self.kmeans_pool_rows.fill_(pool.shape[0])
            return
        vectors = kmeans(pool, self.cfg.codebook_size, self.cfg.kmeans_iters, spherical=self.cfg.cosine)
        self.usage.restart_()
        for buffer in self.window_buffers():
            buffer.zero_()
        self._window_filled = False
        self.write_codes_(everything, distributed.broadcast_(vectors))
        self.kmeans_pool.zero_()
        self.kmeans_pool_rows.zero_()
        self.initialized.fill_(True)
        self._known_initialized = True

    def has_pending_updates(self) -> bool:
        return self._pending

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        windows = self.window_buffers()
        for buffer in windows:
            distributed.all_reduce_sum_(buffer)
        # Every rank forwarded the same number of times and initialised at the same forward (the
        # k-means pool is gathered), so every rank takes the same branches below.
        if self._window_filled:
            self.usage.update_()
            self.update_codebook_()
            if self.cfg.replaces_dead_codes:
                self._replace_dead_codes_()
        for buffer in windows:
            buffer.zero_()
        self._latest = None
        self._pending = self._window_filled = False

    def _replace_dead_codes_(self) -> None:
        """Re-seed dead codes from the latest latents, gathered from every rank and drawn with a
        step-seeded generator, so that every rank writes the same rows."""
        size = self.cfg.codebook_size
        step = self.usage.step_count()
        latest = self._latest
        if latest is None:
            latest = torch.empty(0, self.cfg.lookup_dim, device=self.usage.window.device)
        local = sample_rows(
            latest, min(latest.shape[0], size), seed=step * distributed.world_size() + distributed.rank()
        )
        pool = distributed.all_gather_cat(local)  # (sum of ranks' rows, d), identical on every rank
        if pool.shape[0] == 0:
            return
        vectors = sample_rows(pool, size, seed=step)  # (K, d), already normalised in cosine mode
        dead = self.usage.dead(self.cfg.dead_code_steps, self.cfg.dead_code_threshold)  # (K,)
        self.usage.reset_(dead, max(INITIAL_COUNT, self.cfg.dead_code_threshold))
        self.write_codes_(dead, vectors)
