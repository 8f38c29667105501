"""The quantizer contract shared by every method (docs/architecture.md, "Quantizer")."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from vqlab import codes as codes_lib
from vqlab.registry import Registry
from vqlab.runtime import fp32_island

registry = Registry("quantizer")


@dataclass(frozen=True)
class QuantizerConfig:
    """Base of every quantizer's own config; ``name`` selects the registered quantizer."""

    name: str = "fsq"

    @classmethod
    def variant(cls, name: str) -> type[QuantizerConfig]:
        return registry.get(name).config_cls


@dataclass
class QuantizerOutput:
    """What every quantizer returns for channel-last tokens ``z: (B, N, D)``.

    z_q:    (B, N, D) quantized latents in the input dtype, with the quantizer's gradient estimator
    codes:  (B, N, G) int64 digits, one column per radix
    losses: scalar losses, already weighted; the trainer sums them
    stats:  detached batch statistics
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value ``q`` exactly (not ``x + (q - x)``, which rounds), gradient of ``x``."""
    return q.detach() + (x - x.detach())


# A dense histogram costs O(codebook), sorting the batch's codes O(tokens log tokens): on a CPU
# core the two cost the same near 4 codes per token (1000 codes: dense 0.16 ms, sorted 0.38 ms;
# 262,144 codes: 2.6 ms against 0.42 ms, for 8192 tokens).
DENSE_CODES_PER_TOKEN = 4


def batch_stats(codes: torch.Tensor, radices: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Perplexity and number of distinct codes among the batch's tokens (detached), without a
    host-device sync and in memory bounded by the batch whatever the codebook: a dense histogram
    of the codebook where it has at most ``DENSE_CODES_PER_TOKEN`` codes per token, else the
    lengths of the runs of equal codes once the tokens' codes are sorted."""
    if not radices:
        return {}
    rows = codes.detach().reshape(-1, codes.shape[-1])  # (tokens, G)
    size = codes_lib.codebook_size(radices)
    if size <= DENSE_CODES_PER_TOKEN * len(rows):
        flat = codes_lib.digits_to_index(rows, radices)
        counts = torch.zeros(size, device=codes.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    else:
        counts = run_lengths(sorted_codes(rows, radices))
    return {"perplexity": codes_lib.perplexity(counts).float(), "distinct_codes": (counts > 0).sum().float()}


def sorted_codes(rows: torch.Tensor, radices: tuple[int, ...]) -> torch.Tensor:
    """``(tokens, G)`` digits -> the same rows in lexicographic order, as ``(tokens, 1)`` flat
    indices where they fit an int64, else as the digits themselves (one stable sort per column,
    last column first)."""
    if codes_lib.fits_int64(radices):
        return codes_lib.digits_to_index(rows, radices).sort().values[:, None]
    order = torch.arange(len(rows), device=rows.device)
    for column in reversed(range(rows.shape[-1])):
        order = order[rows[order, column].sort(stable=True).indices]
    return rows[order]


def run_lengths(rows: torch.Tensor) -> torch.Tensor:
    """Sorted ``(tokens, G)`` rows -> ``(tokens,)`` counts: the length of each run of equal rows,
    then zeros (a histogram of the codes seen, in the shape of the batch)."""
    starts = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
    starts[1:] = (rows[1:] != rows[:-1]).any(dim=-1)
    run = starts.cumsum(0) - 1  # (tokens,) the run each row belongs to
    return torch.zeros(len(rows), device=rows.device).index_add_(0, run, torch.ones_like(run, dtype=torch.float32))


class Quantizer(nn.Module):
    """Base class. Subclasses set ``dim`` and ``radices`` and implement ``quantize``,
    ``encode`` and ``decode`` on fp32 tensors; the base runs them in the fp32 island,
    checks shapes and finiteness and adds batch statistics.

    Hook contract. State that learns from statistics (EMA codebooks, usage counts, dead-code
    replacement) is gathered by training forwards and applied by ``on_optimizer_step()``, once
    per optimizer step after ``optimizer.step()``, on every rank. A driver that calls it (vqlab's
    trainer, or a user's own loop) declares so once with ``hooks_driven_by_caller()``. Until one
    does, the quantizer drives itself: a training forward that finds the previous training
    forwards' statistics still pending applies them first, by calling its own
    ``on_optimizer_step()``, and warns once. That is one update per training forward: right for
    a plain loop, wrong with gradient accumulation, whose driver must call the hook itself. The
    decision depends only on which forwards ran, so under DDP, where every rank runs the same
    forwards, every rank calls the hook's collectives alike. Subclasses with such state override
    ``has_pending_updates``.
    """

    dim: int
    radices: tuple[int, ...]
    discrete: bool = True  # False only for the continuous baseline, which has no codes to decode
    # Names of the losses that are means over the input's elements (the MSE commitment and codebook
    # losses). The others (entropies, KL) are sums over a token's channels or codes, averaged over
    # tokens. A product of groups averages the first kind and adds up the second, so that its
    # losses weigh the same as one quantizer over the full width.
    mean_losses: frozenset[str] = frozenset()

    def __init__(self):
        super().__init__()
        self._hooks_driven_by_caller = False
        self._finiteness_checked_by_caller = False
        self._warned_self_driven = False
        self._batch_stats_wanted = True

    @property
    def codebook_size(self) -> int:
        return math.prod(self.radices)

    def set_step(self, step: int, total_steps: int) -> None:
        """Step-dependent schedules (temperatures, warmups); the trainer calls it before every
        optimizer step's forward passes, on every rank."""

    def on_optimizer_step(self) -> None:
        """Apply state updates gathered over the optimizer step's forward passes (EMA codebook
        statistics, dead-code replacement). Its driver (the trainer, a user's loop, or the quantizer
        itself: see the class docstring) calls it once per optimizer step, after ``optimizer.step()``,
        on every rank; collectives go here, in the same order on all ranks."""

    def hooks_driven_by_caller(self) -> Quantizer:
        """Declare that the caller calls ``on_optimizer_step()`` once per optimizer step, so the
        quantizer never applies pending updates on its own (see the class docstring); returns self."""
        self._hooks_driven_by_caller = True
        return self

    def finiteness_checked_by_caller(self) -> Quantizer:
        """Declare that the caller stops on a non-finite loss (vqlab's trainer does), so a training
        forward does not stop on non-finite tokens itself: it quantizes them as zeros (no NaN
        becomes a code or reaches a codebook statistic) and carries their NaN or inf into ``z_q``,
        so the loss is non-finite and the caller stops the way it stops for any diverging step.
        ``encode`` and eval-mode forwards still refuse them; returns self."""
        self._finiteness_checked_by_caller = True
        return self

    def batch_stats_wanted(self, wanted: bool) -> Quantizer:
        """Whether the next training forwards add the batch statistics (``batch_stats``) to
        ``stats``. The trainer reads them only at log steps and asks for them only there: on a CPU
        they cost as much as FSQ's own rounding. Eval forwards always add them; returns self."""
        self._batch_stats_wanted = wanted
        return self

    def has_pending_updates(self) -> bool:
        """Whether training forwards gathered statistics that ``on_optimizer_step()`` has not applied;
        a host-side flag, so asking costs no device sync."""
        return False

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        watched = self.training and self._finiteness_checked_by_caller
        self._check_tokens(z, "forward", finite=not watched)
        if self.training and not self._hooks_driven_by_caller and self.has_pending_updates():
            self._drive_own_hook()
        # watched: non-finite tokens are quantized as zeros and their NaN/inf added back (no gradient)
        clean = torch.where(torch.isfinite(z), z, torch.zeros((), dtype=z.dtype, device=z.device)) if watched else z
        with fp32_island(z.device):
            out = self.quantize(clean.float())  # (B, N, D) fp32 in, fp32 out
            if watched:
                out.z_q = out.z_q + (z.float() - clean.float()).detach()
        out.z_q = out.z_q.to(z.dtype)
        if self._batch_stats_wanted or not self.training:
            out.stats = {**batch_stats(out.codes, self.radices), **out.stats}
        return out

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, N, G)`` int64 codes, without losses or state updates."""
        self._check_tokens(z, "encode")
        with fp32_island(z.device), torch.no_grad():
            return self.encode_fp32(z.float())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(..., G)`` int64 codes, digits in ``[0, radix)``, -> ``(..., D)`` fp32 latents (``== z_q`` in eval)."""
        if codes.is_floating_point() or codes.shape[-1] != len(self.radices):
            raise ValueError(
                f"codes must be an integer tensor (..., {len(self.radices)}), got {codes.dtype} {tuple(codes.shape)}"
            )
        codes_lib.check_digits(codes, self.radices, f"{type(self).__name__}.decode")
        with fp32_island(codes.device):
            return self.decode_fp32(codes.long())

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` tokens -> ``(B, N, D)`` the continuous values that quantization snaps to
        ``z_q`` (in ``z_q``'s space, so the decoder reads them as it reads ``z_q``); the analysis
        studies quantize them other ways. For the quantizers where it is defined."""
        raise NotImplementedError(f"{type(self).__name__} does not define its relaxed (pre-rounding) values")

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        raise NotImplementedError

    def encode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_fp32(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _drive_own_hook(self) -> None:
        if not self._warned_self_driven:
            self._warned_self_driven = True
            warnings.warn(
                f"{type(self).__name__}: on_optimizer_step() was not called after the last training forward, "
                "so the statistics it gathered (EMA codebook, usage counts, dead codes) were not applied. "
                "Applying them now and from here on at every training forward "
                "(auto mode: one update per training forward). "
                "In your own loop call q.on_optimizer_step() after each optimizer.step() and "
                "q.hooks_driven_by_caller() once; with gradient accumulation you must. "
                "See README, 'Running your own'.",
                UserWarning,
                stacklevel=3,
            )
        self.on_optimizer_step()

    def _check_tokens(self, z: torch.Tensor, method: str, finite: bool = True) -> None:
        if z.ndim != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects tokens (B, N, {self.dim}), got {tuple(z.shape)}")
        if not finite:
            return
        # Before any statistic is gathered: a NaN would otherwise become a code, or poison a codebook.
        # Asynchronous, so no host-device sync per step: on a GPU it fails at the next sync.
        torch._assert_async(
            torch.isfinite(z).all(), f"{type(self).__name__}.{method}: the input tokens contain NaN or inf"
        )
