"""Integer-code behaviour: ``python -m analysis.integer_codes --runs runs/<exp>/<run> ...``.

The seed study asked: "Is it important to convert it into an integer, rather than its corresponding
embedding?" For each trained tokenizer (its newest checkpoint, on its validation crops unless said
otherwise):

- ``digit_entropy_{i}`` (bits, Miller–Madow) of each digit, ``code_bits`` the measured rate of the
  whole code (``measured_rate``), and the mutual information between every two digits, raw, its
  shuffle null and their difference (``analysis.estimators``; 95% bootstrap intervals over crops);
- locality: Spearman correlation, over random pairs of held-out tokens, of a code distance
  (|Δ flat index|, digit L1, Hamming) with the distance of the codes' embeddings (``decode``) and
  with the difference of the images decoded from them (every token of an image set to the code);
- per-digit sensitivity: the mean absolute change of the decoded image (on [0, 1]) when one digit of
  one token moves by ±1;
- stability: the share of codes that change under Gaussian pixel noise (``NOISE`` on [-1, 1]
  images) and under a one-pixel shift;
- integer versus embedding: a small causal transformer prior over the images' code sequences
  (raster order), trained four ways on the training crops' codes and measured on the validation
  crops' — ``flat``: one embedding per flat index and a softmax over all K codes; ``factorised``: a
  sum of per-digit embeddings and one softmax head per digit (the digits of a token predicted
  independently given the past, as in Open-MAGVIT2's token factorisation); ``autoregressive``: the
  same heads, digit i also given digits 0..i-1 of the same token (the exact chain rule);
  ``regression``: the next token's embedding regressed (MSE) and quantized afterwards to the code of
  the nearest embedding. Every prior is sized to the same parameter count (``matched_sizes``: within
  a fraction of a percent), trained with several seeds until its loss on a held-out share of the
  training codes stops improving (the best weights kept; the curves saved), and measured in bits
  per token on the validation codes (the three likelihoods: mean over seeds and a 95% t interval),
  next-token accuracy and the L1 of the images decoded from the teacher-forced predictions (all
  four; regression's only measures, reported apart: it is not a likelihood);
- the generative check, which needs no pretrained weights: as many code sequences as validation
  crops sampled from each prior (ancestral sampling; regression, which has no distribution, rolled
  out from first tokens of training sequences), decoded, and scored with SWD against the validation
  crops (mean over the prior seeds, 95% t interval), beside three references: real training crops,
  the validation codes decoded (a perfect prior's score) and tokens drawn with no context.

Each run's results go to ``<root>/integer_codes/<run>/result.json`` with the settings that made
them; a rerun reads a run's file instead of analysing it again where the settings are the same
(``--again`` analyses it anyway), so a killed command continues, and ``table.md`` can gather runs
analysed by several commands (``--jobs`` analyses several at once).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis import estimators
from analysis.runs import keep, kept, label
from vqlab import checkpoint, tables
from vqlab.codes import digits_to_index
from vqlab.errors import UserError
from vqlab.runfolder import CONFIG_FILE, RunFolder

NOISE = 2 / 255 * 2  # two grey levels of an 8-bit image, on [-1, 1]
PAIRS = 4096  # random token pairs for the locality correlations
PRIORS = ("flat", "factorised", "autoregressive", "regression")
LIKELIHOODS = PRIORS[:3]  # the priors that give bits per token; regression's MSE is not a likelihood
DIGIT_PRIORS = ("factorised", "autoregressive")
HEADS, LAYERS = 4, 2  # attention heads and layers of every prior's transformer
HELD_OUT_SHARE = 0.1  # of the training sequences, for early stopping
EVAL_BATCH = 256  # sequences per evaluation forward
SHOWN = 8  # sampled images per prior in the samples figure
SWD_POSITIONS = 32  # neighbourhoods per image in the generative check (the evaluator's 128 costs 4x)


# --- statistics of the digits ----------------------------------------------------------------------
def mean_off_diagonal(matrix: np.ndarray) -> float:
    off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)]
    return float(off_diagonal.mean()) if off_diagonal.size else math.nan


def digit_statistics(codes: torch.Tensor, radices: tuple[int, ...], seed: int = 0) -> dict:
    """``(C, L, G)`` codes of C crops -> the digits' Miller–Madow entropies (``digit_entropy_{i}``),
    the mean pairwise MI raw, its shuffle null and their difference (with a 95% bootstrap interval
    over crops), the rate of the whole code (``code_bits``: ``measured_rate``, Miller–Madow, interval
    over crops) and the ``(G, G)`` matrices (``mutual_information``: entropies on the diagonal,
    corrected MI off it; ``_raw`` and ``_null``)."""
    from vqlab.evaluators.codebook import measured_rate

    tokens = codes.flatten(0, 1)  # (C*L, G)
    single = estimators.entropies(tokens, radices)
    result: dict = {f"digit_entropy_{i}": h for i, h in enumerate(single)}
    found = estimators.information(tokens, radices, seed=seed)
    result["mean_pairwise_mi"] = mean_off_diagonal(found["raw"])
    result["mean_pairwise_mi_null"] = mean_off_diagonal(found["null"])
    result["mean_pairwise_mi_corrected"] = mean_off_diagonal(found["corrected"])
    if len(radices) > 1:
        _, low, high = estimators.bootstrap_over_crops(
            codes, lambda t: mean_off_diagonal(estimators.information(t, radices, seed=seed)["corrected"]), seed=seed
        )
        result["mean_pairwise_mi_corrected_low"], result["mean_pairwise_mi_corrected_high"] = float(low), float(high)
    crop = torch.arange(len(codes)).repeat_interleave(codes.shape[1]).numpy()  # (C*L,) each token's crop
    result["code_bits"], result["code_bits_low"], result["code_bits_high"] = measured_rate(
        crop, tokens.numpy(), seed=seed
    )
    # entropy on the diagonal, corrected information off it: the figure
    result["mutual_information"] = found["corrected"] + np.diag(single)
    result["mutual_information_raw"], result["mutual_information_null"] = found["raw"], found["null"]
    return result


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


def locality(
    codes: torch.Tensor, radices: tuple[int, ...], embed, image_of=None, pairs: int = PAIRS, seed: int = 0
) -> dict[str, float]:
    """Spearman correlations of code distances with embedding (and decoded-image) distances over
    ``pairs`` random pairs of the ``(M, G)`` codes. ``embed``: digits -> embeddings; ``image_of``:
    digits -> decoded images (optional)."""
    generator = torch.Generator().manual_seed(seed)
    a, b = (codes[torch.randint(len(codes), (pairs,), generator=generator)] for _ in range(2))
    keep = (a != b).any(-1)  # identical codes say nothing about distance
    a, b = a[keep], b[keep]
    code_distances = {
        "index": (digits_to_index(a, radices) - digits_to_index(b, radices)).abs(),
        "digit_l1": (a - b).abs().sum(-1),
        "hamming": (a != b).sum(-1),
    }
    targets = {"embedding": (embed(a) - embed(b)).norm(dim=-1)}
    if image_of is not None:
        targets["image"] = (image_of(a) - image_of(b)).abs().flatten(1).mean(-1)
    result = {}
    for name, distance in code_distances.items():
        for target, value in targets.items():
            result[f"locality_{name}_vs_{target}"] = (
                spearman(distance, value) if distance.unique().numel() > 1 else math.nan
            )
    return result


# --- a trained tokenizer ----------------------------------------------------------------------------
@dataclass
class Tokenizer:
    """A run's model with the three maps the studies need."""

    model: nn.Module
    grid: tuple[int, int]

    @property
    def radices(self) -> tuple[int, ...]:
        return tuple(self.model.quantizer.radices)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, h*w, G)`` codes."""
        return torch.cat([self.model.encode(batch).flatten(1, 2) for batch in images.split(256)])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, h*w, G)`` codes -> images clamped to [-1, 1]."""
        return torch.cat(
            [self.model.decode(batch.reshape(len(batch), *self.grid, -1)).clamp(-1, 1) for batch in codes.split(256)]
        )

    @torch.no_grad()
    def embed(self, digits: torch.Tensor) -> torch.Tensor:
        """``(M, G)`` -> ``(M, D)`` quantized latents."""
        return self.model.quantizer.decode(digits[:, None, :])[:, 0].float()

    @torch.no_grad()
    def nearest_code(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., G)`` the code whose embedding is nearest (the regression prior's
        quantization; ``encode`` would not do: it takes pre-quantization latents, e.g. FSQ's unbounded ones)."""
        from vqlab.cluster import nearest
        from vqlab.codes import index_to_digits

        table = self.embed(index_to_digits(torch.arange(math.prod(self.radices)), self.radices))  # (K, D)
        index = nearest(embeddings.reshape(-1, embeddings.shape[-1]).float(), table)
        return index_to_digits(index, self.radices).reshape(*embeddings.shape[:-1], -1)

    @torch.no_grad()
    def image_of(self, digits: torch.Tensor) -> torch.Tensor:
        """The image decoded when every token is this code."""
        return self.decode(digits[:, None, :].expand(-1, self.grid[0] * self.grid[1], -1))


@torch.no_grad()
def sensitivity(tokenizer: Tokenizer, codes: torch.Tensor, seed: int = 0) -> list[float]:
    """Per digit: mean |Δ decoded image| on [0, 1] when that digit of one random token of each image
    moves by one step (+1, or -1 at the top of its range)."""
    generator = torch.Generator().manual_seed(seed)
    base = tokenizer.decode(codes)
    position = torch.randint(codes.shape[1], (len(codes),), generator=generator)
    rows = torch.arange(len(codes))
    result = []
    for i, radix in enumerate(tokenizer.radices):
        moved = codes.clone()
        digit = moved[rows, position, i]
        moved[rows, position, i] = torch.where(digit + 1 < radix, digit + 1, digit - 1)
        result.append(float((tokenizer.decode(moved) - base).abs().mean() / 2))
    return result


@torch.no_grad()
def stability(tokenizer: Tokenizer, images: torch.Tensor, codes: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Share of tokens whose code changes under pixel noise and under a one-pixel shift."""
    generator = torch.Generator().manual_seed(seed)
    noisy = (images + NOISE * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    shifted = torch.roll(images, shifts=1, dims=-1)
    changed = {
        name: (tokenizer.encode(x) != codes).any(-1).float().mean().item()
        for name, x in (("noise", noisy), ("shift", shifted))
    }
    return {"changed_under_noise": changed["noise"], "changed_under_shift": changed["shift"]}


# --- the autoregressive priors ----------------------------------------------------------------------
class DigitHeads(nn.Module):
    """One small MLP head per digit, ``(..., W)`` -> its ``(..., radix)`` logits: the factorised and the
    autoregressive priors share them, so that they differ only in what a digit is conditioned on."""

    def __init__(self, width: int, radices: tuple[int, ...]):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, r)) for r in radices
        )

    def forward(self, contexts: list[torch.Tensor]) -> torch.Tensor:
        """Digit i's logits from ``contexts[i]`` ``(B, L, W)`` -> ``(B, L, sum radices)``."""
        return torch.cat([head(context) for head, context in zip(self.heads, contexts, strict=True)], dim=-1)


class Prior(nn.Module):
    """A causal transformer over code sequences, with the input and output of one of ``PRIORS``.

    ``autoregressive`` is the exact chain rule within a token: digit i of token t is predicted from
    the tokens before t (the transformer's state h) and from digits 0..i-1 of token t, as
    ``head_i(h + sum_{k<i} E_k(d_k))``; its loss on the true earlier digits (teacher forcing) is the
    sequence's exact negative log-likelihood. ``factorised`` is the same heads on h alone."""

    def __init__(
        self,
        kind: str,
        radices: tuple[int, ...],
        length: int,
        embed_dim: int = 0,
        width: int = 128,
        layers: int = LAYERS,
        feedforward: int = 0,
    ):
        super().__init__()
        if kind not in PRIORS:
            raise ValueError(f"unknown prior {kind!r}; one of {', '.join(PRIORS)}")
        self.kind, self.radices = kind, radices
        size = math.prod(radices)
        self.start = nn.Parameter(torch.zeros(width))
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        if kind == "flat":
            self.inputs = nn.Embedding(size, width)
            self.head = nn.Linear(width, size)
        elif kind in DIGIT_PRIORS:
            self.inputs = nn.ModuleList(nn.Embedding(r, width) for r in radices)
            self.head = DigitHeads(width, radices)
            if kind == "autoregressive":  # the earlier digits of the same token, as the later heads read them
                self.within = nn.ModuleList(nn.Embedding(r, width) for r in radices[:-1])
        else:
            self.inputs = nn.Linear(embed_dim, width)
            self.head = nn.Linear(width, embed_dim)
        block = nn.TransformerEncoderLayer(
            width, HEADS, feedforward or 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)

    def embed_inputs(self, codes: torch.Tensor, latents: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "flat":
            return self.inputs(digits_to_index(codes, self.radices))
        if self.kind in DIGIT_PRIORS:
            return sum(table(codes[..., i]) for i, table in enumerate(self.inputs))
        return self.inputs(latents)

    def hidden(self, codes: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, G)`` codes (and ``(B, L, D)`` embeddings for ``regression``) -> ``(B, L, W)``: token
        t's state from the tokens before it."""
        x = self.embed_inputs(codes, latents)[:, :-1]  # (B, L-1, W): token t is input to predict t+1
        x = torch.cat([self.start.expand(len(codes), 1, -1), x], dim=1) + self.position  # (B, L, W)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.body(x, mask=mask, is_causal=True)

    def prefixes(self, h: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Each digit head's input: ``h``, plus the earlier digits of ``codes`` for ``autoregressive``."""
        if self.kind == "factorised":
            return [h] * len(self.radices)
        contexts = [h]
        for i, table in enumerate(self.within):
            contexts.append(contexts[-1] + table(codes[..., i]))
        return contexts

    def outputs(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, K)`` (flat), per-digit logits ``(B, L, sum radices)`` (digit priors, the
        autoregressive ones given the true earlier digits of ``codes``), or embeddings ``(B, L, D)``."""
        if self.kind in DIGIT_PRIORS:
            return self.head(self.prefixes(h, codes))
        return self.head(h)

    def forward(self, codes: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        return self.outputs(self.hidden(codes, latents), codes)

    def loss(self, output: torch.Tensor, codes: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Nats per token (``flat``, digit priors: summed over the digits) or the MSE (``regression``)."""
        if self.kind == "flat":
            return F.cross_entropy(output.flatten(0, 1), digits_to_index(codes, self.radices).flatten())
        if self.kind in DIGIT_PRIORS:
            pieces = output.split(list(self.radices), dim=-1)
            return sum(F.cross_entropy(p.flatten(0, 1), codes[..., i].flatten()) for i, p in enumerate(pieces))
        return F.mse_loss(output, latents)

    def predict(self, h: torch.Tensor, nearest_code=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The predicted codes ``(..., G)`` from the states ``h`` ``(..., W)``: the most likely code
        (flat), each digit's most likely value (factorised), digit by digit on the predicted earlier
        ones (autoregressive, greedy), or the code nearest the regression. Given a ``generator``, a
        draw from the prior's distribution instead of its mode (regression has none: still the
        nearest code)."""

        def choose(logits: torch.Tensor) -> torch.Tensor:
            if generator is None:
                return logits.argmax(-1)
            probabilities = logits.float().softmax(-1).reshape(-1, logits.shape[-1])
            return torch.multinomial(probabilities, 1, generator=generator).reshape(logits.shape[:-1])

        if self.kind == "flat":
            from vqlab.codes import index_to_digits

            return index_to_digits(choose(self.head(h)), self.radices)
        if self.kind == "factorised":
            return torch.stack([choose(p) for p in self.outputs(h, None).split(list(self.radices), dim=-1)], -1)
        if self.kind == "autoregressive":
            digits, context = [], h
            for i, head in enumerate(self.head.heads):
                digits.append(choose(head(context)))
                if i < len(self.within):
                    context = context + self.within[i](digits[-1])
            return torch.stack(digits, dim=-1)
        return nearest_code(self.head(h))

    @torch.no_grad()
    def sample(
        self, count: int, length: int, generator: torch.Generator, tokenizer=None, first: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(count, length, G)`` code sequences drawn token by token (ancestral sampling). The
        regression prior has no distribution: its sequences are rollouts from the given ``first``
        tokens ``(count, G)``, each next token the code nearest its regression (``tokenizer`` embeds
        the codes it reads and finds the nearest code)."""
        codes = torch.zeros(count, length, len(self.radices), dtype=torch.long)
        for t in range(length):
            if self.kind == "regression" and t == 0:
                codes[:, 0] = first
                continue
            latents = None
            if self.kind == "regression":
                latents = tokenizer.embed(codes.flatten(0, 1)).reshape(count, length, -1)
            h = self.hidden(codes, latents)[:, t]  # (count, W): causal, so the zeros after t are not read
            codes[:, t] = self.predict(h, tokenizer.nearest_code if tokenizer else None, generator)
        return codes


def parameter_count(
    kind: str, radices: tuple[int, ...], length: int, embed_dim: int, width: int, feedforward: int
) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        prior = Prior(kind, radices, length, embed_dim, width, feedforward=feedforward)
    return sum(p.numel() for p in prior.parameters())


@dataclass(frozen=True)
class PriorSize:
    width: int
    feedforward: int
    parameters: int


def size_prior(kind: str, radices: tuple[int, ...], length: int, target: int, embed_dim: int = 0) -> PriorSize:
    """The prior of ``kind`` with about ``target`` parameters: the width (a multiple of ``HEADS``)
    whose count at the usual ``4 x width`` feed-forward is nearest, then the feed-forward width that
    brings the count nearest (the count is affine in it, with a slope of about ``2 x layers x
    width``, so it lands within a hair of the target: widths alone step by up to 10%)."""

    def count(width: int, feedforward: int) -> int:
        return parameter_count(kind, radices, length, embed_dim, width, feedforward)

    if count(HEADS, 4 * HEADS) > target:
        raise ValueError(f"a {kind} prior has more than {target} parameters at its smallest width")
    low, high = 1, 1
    while count(HEADS * high, 4 * HEADS * high) <= target:  # bracket, then bisect, in units of HEADS
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(HEADS * middle, 4 * HEADS * middle) <= target else (low, middle)
    width = min((HEADS * low, HEADS * high), key=lambda w: abs(count(w, 4 * w) - target))
    base = count(width, 4 * width)
    slope = count(width, 4 * width + 1) - base
    feedforward = max(1, 4 * width + round((target - base) / slope))
    return PriorSize(width, feedforward, count(width, feedforward))


def matched_sizes(
    kinds: tuple[str, ...], radices: tuple[int, ...], length: int, embed_dim: int = 0, target: int = 0
) -> dict[str, PriorSize]:
    """Every kind sized to ``target`` parameters (0: the flat prior's count at width 128)."""
    target = target or parameter_count("flat", radices, length, embed_dim, 128, 4 * 128)
    return {kind: size_prior(kind, radices, length, target, embed_dim) for kind in kinds}


class EarlyStopping:
    """Held-out losses, one per evaluation: ``update`` says when ``patience`` evaluations in a row
    have not improved on the best, keeping a copy of the weights at the best; ``restore`` loads it."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_step, self.waited, self.state = patience, math.inf, 0, 0, None

    def update(self, step: int, loss: float, module: nn.Module) -> bool:
        if loss < self.best:
            self.best, self.best_step, self.waited = loss, step, 0
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.waited += 1
        return self.waited >= self.patience

    def restore(self, module: nn.Module) -> None:
        module.load_state_dict(self.state)


@dataclass
class PriorResult:
    kind: str
    seed: int
    bits_per_token: float  # on the validation codes; NaN for regression (not a likelihood)
    accuracy: float
    decoded_l1: float
    parameters: int
    best_step: int  # the step whose weights were kept
    stopped_at: int
    held_out_loss: float  # of the kept weights on the held-out training codes (nats per token, or MSE)
    curve: list[dict]  # per evaluation: step, train (mean loss since the last), held_out
    swd: float  # x 10^3, of images decoded from sampled sequences against the validation crops
    samples: torch.Tensor  # the first ``SHOWN`` of those images, for the figure


def train_prior(
    kind: str,
    tokenizer: Tokenizer,
    train_codes: torch.Tensor,
    val_codes: torch.Tensor,
    val_images: torch.Tensor,
    size: PriorSize | None = None,
    max_steps: int = 5000,
    eval_every: int = 50,
    patience: int = 5,
    held_out_share: float = HELD_OUT_SHARE,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> PriorResult:
    """Fit one prior on ``(N, L, G)`` training code sequences until its loss on a held-out share of
    them (drawn with ``seed``) has not improved for ``patience`` evaluations, every ``eval_every``
    steps, or ``max_steps``; keep the best weights; measure them on the validation sequences."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    radices = tokenizer.radices
    embed_dim = tokenizer.embed(train_codes[:1, 0]).shape[-1]
    size = size or matched_sizes((kind,), radices, train_codes.shape[1], embed_dim)[kind]
    prior = Prior(kind, radices, train_codes.shape[1], embed_dim, size.width, feedforward=size.feedforward)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_codes), generator=generator)
    held = max(1, round(held_out_share * len(train_codes)))
    held_out, fitted = train_codes[order[:held]], train_codes[order[held:]]

    def latents_of(codes: torch.Tensor) -> torch.Tensor | None:
        return tokenizer.embed(codes.flatten(0, 1)).reshape(*codes.shape[:2], -1) if kind == "regression" else None

    @torch.no_grad()
    def mean_loss(codes: torch.Tensor) -> float:
        """The loss per token over ``codes``, in eval mode (the transformer's inference path), then
        back to training."""
        prior.eval()
        total = 0.0
        for part in codes.split(EVAL_BATCH):
            latents = latents_of(part)
            total += prior.loss(prior(part, latents), part, latents).item() * len(part)
        prior.train()
        return total / len(codes)

    stopping, curve, recent, step = EarlyStopping(patience), [], [], 0
    for step in tqdm(range(1, max_steps + 1), desc=f"prior {kind}", disable=not progress):
        batch = fitted[torch.randint(len(fitted), (batch_size,), generator=generator)]
        latents = latents_of(batch)
        loss = prior.loss(prior(batch, latents), batch, latents)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recent.append(loss.item())
        if step % eval_every == 0 or step == max_steps:
            curve.append({"step": step, "train": float(np.mean(recent)), "held_out": mean_loss(held_out)})
            recent = []
            if stopping.update(step, curve[-1]["held_out"], prior):
                break
    stopping.restore(prior)
    held_out_loss = mean_loss(held_out)
    bits = math.nan if kind == "regression" else mean_loss(val_codes) / math.log(2)
    prior.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [
                prior.predict(prior.hidden(part, latents_of(part)), tokenizer.nearest_code)
                for part in val_codes.split(EVAL_BATCH)
            ]
        )
        accuracy = (predicted == val_codes).all(-1).float().mean().item()
        l1 = float((tokenizer.decode(predicted) - val_images).abs().mean() / 2)
        # the generative check: as many sequences as validation crops (regression: rollouts from
        # first tokens of training sequences, drawn with the same generator)
        first = fitted[torch.randint(len(fitted), (len(val_codes),), generator=generator), 0]
        sampled = tokenizer.decode(prior.sample(len(val_codes), val_codes.shape[1], generator, tokenizer, first))
    swd = set_swd(val_images, sampled, seed)
    return PriorResult(
        kind,
        seed,
        bits,
        accuracy,
        l1,
        size.parameters,
        stopping.best_step,
        step,
        held_out_loss,
        curve,
        swd,
        sampled[:SHOWN],
    )


def set_swd(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, per_image: int = SWD_POSITIONS) -> float:
    """SWD x 10^3 (``vqlab.evaluators.swd``, mean over its pyramid levels) between two equal-sized
    image sets in [-1, 1] that need not be pairs: the evaluator's positions are drawn per real image
    and its descriptor sets compared as distributions."""
    from vqlab.evaluators.swd import SlicedWasserstein

    evaluator = SlicedWasserstein(torch.device("cpu"), max_images=len(real), per_image=per_image, seed=seed)
    evaluator.update_pairs(real.cpu(), fake.cpu())
    return evaluator.compute()["swd"]


def unigram_codes(train_codes: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, length, G)`` tokens drawn independently from the training tokens (their empirical
    marginal): a prior with no context, the generative check's weak control."""
    tokens = train_codes.flatten(0, 1)
    return tokens[torch.randint(len(tokens), (count * length,), generator=generator)].reshape(count, length, -1)


def summarise_priors(results: list[PriorResult]) -> dict:
    """Per kind over its seeds: ``prior_{kind}_bits`` and ``prior_{kind}_swd`` (means) with ``_low``
    and ``_high`` (95% Student-t interval; NaN for one seed), accuracy, decoded L1, parameters and
    the best steps."""
    from vqlab.report import half_width

    summary: dict = {}
    for kind in dict.fromkeys(r.kind for r in results):
        mine = [r for r in results if r.kind == kind]
        for key, values in (("bits", [r.bits_per_token for r in mine]), ("swd", [r.swd for r in mine])):
            mean, half = float(np.mean(values)), half_width(values)
            summary |= {
                f"prior_{kind}_{key}": mean,
                f"prior_{kind}_{key}_low": mean - half,
                f"prior_{kind}_{key}_high": mean + half,
            }
        summary[f"prior_{kind}_accuracy"] = float(np.mean([r.accuracy for r in mine]))
        summary[f"prior_{kind}_decoded_l1"] = float(np.mean([r.decoded_l1 for r in mine]))
        summary[f"prior_{kind}_parameters"] = mine[0].parameters
        summary[f"prior_{kind}_best_step"] = float(np.mean([r.best_step for r in mine]))
        summary[f"prior_{kind}_seeds"] = len(mine)
    return summary


# --- one run, many runs, the command line -------------------------------------------------------------
SMOKE = {
    "train_count": 256,
    "prior_steps": 20,
    "pairs": 256,
    "prior_seeds": 1,
}  # seconds: --smoke, the notebook's smoke


def analyse_run(
    run_dir: str | Path,
    train_count: int = 8192,
    prior_steps: int = 5000,
    pairs: int = PAIRS,
    priors: tuple[str, ...] = PRIORS,
    prior_seeds: int = 3,
    prior_parameters: int = 0,
    patience: int = 5,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Every measurement of the module docstring for one run: a flat dict of numbers, plus
    ``mutual_information`` (a G x G array: entropies on the diagonal, corrected MI off it), its
    ``_raw`` and ``_null``, ``sensitivity`` (a list per digit) and ``prior_curves`` (per prior, one
    training curve per seed). Each prior is sized to ``prior_parameters`` (0: the flat prior's count
    at width 128), trained with seeds ``0 .. prior_seeds - 1`` for at most ``prior_steps`` steps,
    stopped early with ``patience``."""
    from analysis.runs import crops, trained

    cfg, model = trained(run_dir, device)
    if not model.quantizer.radices:
        raise ValueError(f"{run_dir} has a continuous quantizer: no codes to study")
    images = crops(cfg, "val", device=device)
    grid = (images.shape[-2] // model.downsample, images.shape[-1] // model.downsample)
    tokenizer = Tokenizer(model, grid)
    codes = tokenizer.encode(images)  # (B, L, G)
    tokens = codes.flatten(0, 1)
    radices = tokenizer.radices
    result: dict = {"name": label(run_dir), "quantizer": cfg.quantizer.name, "codebook_size": math.prod(radices)}
    result |= digit_statistics(codes, radices)
    result |= locality(tokens, radices, tokenizer.embed, tokenizer.image_of, pairs)
    result |= stability(tokenizer, images, codes)
    result["sensitivity"] = sensitivity(tokenizer, codes)
    train_images = crops(cfg, "train", train_count, device)
    train_codes = tokenizer.encode(train_images)
    embed_dim = tokenizer.embed(codes[:1, 0]).shape[-1]
    sizes = matched_sizes(priors, radices, codes.shape[1], embed_dim, prior_parameters)
    fitted = [
        train_prior(
            kind,
            tokenizer,
            train_codes,
            codes,
            images,
            sizes[kind],
            prior_steps,
            patience=patience,
            seed=seed,
            progress=progress,
        )
        for kind in priors
        for seed in range(prior_seeds)
    ]
    result |= summarise_priors(fitted)
    result["prior_curves"] = {kind: [r.curve for r in fitted if r.kind == kind] for kind in priors}
    result |= generative_controls(tokenizer, images, codes, train_images, train_codes)
    result["samples"] |= {f"{r.kind} prior": r.samples for r in fitted if r.seed == 0}
    result["log2_codebook_size"] = math.log2(result["codebook_size"])
    return result


def _set_threads(count: int) -> None:
    torch.set_num_threads(count)


def analyse_runs(runs: list[Path], jobs: int = 1, **settings):
    """``analyse_run`` of each run, yielded as each is done (so a caller writes it before the next
    finishes); with ``jobs`` > 1, that many runs at once, each in its own process with an equal
    share of this process's torch threads (results depend on the thread count: ``threads_per_run``
    says which one made them)."""
    workers = at_once(jobs, len(runs))
    if workers == 1:
        yield from (analyse_run(run, **settings) for run in runs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    context = multiprocessing.get_context("spawn")  # a forked torch may hang in its thread pool
    threads = threads_per_run(jobs, len(runs))
    with ProcessPoolExecutor(workers, context, initializer=_set_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(analyse_run, run, progress=False, **settings) for run in runs]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=f"runs, {workers} at once", unit="run"):
                yield future.result()
        finally:  # a failed run or a caller that stops: nothing more starts
            for future in futures:
                future.cancel()


def at_once(jobs: int, runs: int) -> int:
    """How many of ``runs`` runs ``analyse_runs`` analyses at once with ``jobs``."""
    return max(1, min(jobs, runs))


def threads_per_run(jobs: int, runs: int) -> int:
    """The torch threads each of ``runs`` runs is analysed with by ``analyse_runs`` with ``jobs``:
    an equal share of this process's among the runs at once."""
    return max(1, torch.get_num_threads() // at_once(jobs, runs))


def generative_controls(
    tokenizer: Tokenizer,
    images: torch.Tensor,
    codes: torch.Tensor,
    train_images: torch.Tensor,
    train_codes: torch.Tensor,
    seed: int = 0,
) -> dict:
    """The generative check's references, each an SWD x 10^3 against the validation crops at their
    count: ``swd_train_crops``, real training crops (what a generator of the data itself scores at
    this count; NaN when fewer training crops were read than validation crops);
    ``swd_reconstructions``, the validation codes decoded (what a perfect prior over this
    tokenizer's codes would score); ``swd_unigram``, tokens drawn independently from the training
    tokens (no context at all). ``samples``: the first ``SHOWN`` images of each, for the figure."""
    generator = torch.Generator().manual_seed(seed)
    reconstructions = tokenizer.decode(codes)
    unigram = tokenizer.decode(unigram_codes(train_codes, len(codes), codes.shape[1], generator))
    result = {
        "swd_train_crops": set_swd(images, train_images[: len(images)], seed)
        if len(train_images) >= len(images)
        else math.nan,
        "swd_reconstructions": set_swd(images, reconstructions, seed),
        "swd_unigram": set_swd(images, unigram, seed),
    }
    shown = {"validation crops": images, "reconstructions": reconstructions, "unigram": unigram}
    return result | {"samples": {label: x[:SHOWN] for label, x in shown.items()}}


def figures(result: dict) -> dict:
    """``mutual_information.png`` (digits x digits, bits), ``sensitivity.png`` (per digit),
    ``prior_curves.png`` (each prior's held-out loss against its steps, one line per seed) and
    ``samples.png`` (a row of decoded samples per prior beside the generative check's references)."""
    from matplotlib.figure import Figure

    made = {}
    information = result["mutual_information"]
    figure = Figure(figsize=(5, 4), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(information, cmap="viridis")
    figure.colorbar(image, ax=ax, label="bits")
    title = f"{result['name']}: MI less its shuffle null (entropy on the diagonal)"
    ax.set(xlabel="digit", ylabel="digit", title=title)
    made["mutual_information.png"] = figure
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    ax = figure.subplots()
    ax.bar(range(len(result["sensitivity"])), result["sensitivity"])
    ax.set(xlabel="digit", ylabel="mean |Δ image| on [0, 1]", title=f"{result['name']}: one digit ±1 on one token")
    made["sensitivity.png"] = figure
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    curves = result["prior_curves"]
    for ax, (kind, seeds) in zip(figure.subplots(1, len(curves), squeeze=False)[0], curves.items(), strict=True):
        for seed, curve in enumerate(seeds):
            scale = 1 if kind == "regression" else math.log(2)  # nats per token -> bits; the MSE as it is
            ax.plot(
                [p["step"] for p in curve], [p["held_out"] / scale for p in curve], marker=".", label=f"seed {seed}"
            )
        ax.set(xlabel="step", ylabel="MSE" if kind == "regression" else "held-out bits per token", title=kind)
    made["prior_curves.png"] = figure
    samples = result.get("samples", {})
    if samples:
        figure = Figure(figsize=(1.1 * SHOWN + 1.5, 1.1 * len(samples)), layout="constrained")
        axes = figure.subplots(len(samples), SHOWN, squeeze=False)
        for row, (label, shown) in zip(axes, samples.items(), strict=True):
            for ax, image in zip(row, shown, strict=False):
                ax.imshow((image.float().permute(1, 2, 0).clamp(-1, 1) + 1).numpy() / 2)
            for ax in row:
                ax.set(xticks=[], yticks=[])
            row[0].set_ylabel(label, rotation=0, ha="right", va="center")
        figure.suptitle(f"{result['name']}: decoded samples of each prior (seed 0) beside the references")
        made["samples.png"] = figure
    return made


def priors_figure(results: list[dict]):
    """``priors.png``: per tokenizer run, each likelihood prior's bits per token on the validation
    codes (mean and 95% t interval over the prior seeds), beside the code's own measured rate (no
    context: what a prior must beat; Miller–Madow, 95% bootstrap interval over crops)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(5.0, 1.8 * len(results) + 2), 4), layout="constrained")
    ax = figure.subplots()
    shown = ["code_bits", *(f"prior_{kind}_bits" for kind in LIKELIHOODS)]
    labels = ["code (no context)", *LIKELIHOODS]
    step = 0.8 / len(shown)
    for i, (key, name) in enumerate(zip(shown, labels, strict=True)):
        x = [r + (i - (len(shown) - 1) / 2) * step for r in range(len(results))]
        means = [result.get(key, math.nan) for result in results]
        below = [m - result.get(f"{key}_low", m) for m, result in zip(means, results, strict=True)]
        above = [result.get(f"{key}_high", m) - m for m, result in zip(means, results, strict=True)]
        ax.errorbar(x, means, yerr=[below, above], fmt="o", capsize=3, label=name)
    ax.set_xticks(range(len(results)), [result["name"] for result in results], rotation=15)
    title = "bits per token: priors (95% t over prior seeds), code's rate (95% bootstrap over crops)"
    ax.set(ylabel="bits per token (validation codes)", title=title)
    ax.legend(fontsize="small")
    return figure


def interval(result: dict, key: str) -> str:
    """``mean [low, high]``, or the mean alone where there is no interval."""
    value, low, high = (result.get(k, math.nan) for k in (key, f"{key}_low", f"{key}_high"))
    if math.isnan(low):
        return tables.cell(value, ".4g")
    return f"{tables.cell(value, '.4g')} [{low:.4g}, {high:.4g}]"


def markdown(results: list[dict]) -> str:
    """Three tables, a row per run. Likelihoods: the code's measured rate and each prior's bits per
    token on the validation codes (mean over seeds, 95% t interval) with its parameters, the digits'
    corrected MI and its shuffle null. Then what is not a likelihood: next-token accuracy and the L1
    of the image decoded from the teacher-forced predictions (regression's only measure), locality,
    stability. Then the generative check: each prior's SWD beside its references."""
    kinds = [k for k in LIKELIHOODS if any(f"prior_{k}_bits" in r for r in results)]
    columns = ["name", "quantizer", "log2 K", "code bits", *(f"{k} bits" for k in kinds)]
    columns += [*(f"{k} params" for k in kinds), "MI corrected", "MI null"]
    rows = [
        [r["name"], r["quantizer"], tables.cell(r["log2_codebook_size"], ".4g"), interval(r, "code_bits")]
        + [interval(r, f"prior_{k}_bits") for k in kinds]
        + [tables.cell(r.get(f"prior_{k}_parameters")) for k in kinds]
        + [interval(r, "mean_pairwise_mi_corrected"), tables.cell(r.get("mean_pairwise_mi_null", math.nan), ".3g")]
        for r in results
    ]
    likelihoods = tables.markdown(columns, rows)
    keys = [f"prior_{k}_accuracy" for k in PRIORS] + ["prior_regression_decoded_l1", "prior_regression_parameters"]
    keys += ["locality_index_vs_embedding", "changed_under_noise", "changed_under_shift"]
    columns = ["name", *(f"{k} acc" for k in PRIORS), "regression L1", "regression params", "index~embedding"]
    columns += ["noise", "shift"]
    rows = [[r["name"]] + [tables.cell(r.get(key, math.nan), ".4g") for key in keys] for r in results]
    decoded = tables.markdown(columns, rows)
    kinds = [k for k in PRIORS if any(f"prior_{k}_swd" in r for r in results)]
    references = {
        "swd_train_crops": "training crops",
        "swd_reconstructions": "reconstructions",
        "swd_unigram": "unigram",
    }
    columns = ["name", *references.values(), *(f"{k} samples" if k in LIKELIHOODS else f"{k} rollouts" for k in kinds)]
    rows = [
        [r["name"], *(tables.cell(r.get(key, math.nan), ".4g") for key in references)]
        + [interval(r, f"prior_{k}_swd") for k in kinds]
        for r in results
    ]
    generated = tables.markdown(columns, rows)
    return (
        f"{likelihoods}\n\nNot likelihoods (the embedding regression has no bits per token): next-token "
        f"accuracy, the L1 of the images decoded from the predicted codes, locality, stability.\n\n{decoded}"
        "\n\nGenerative check: SWD x 10^3 against the validation crops (lower is nearer; mean over the "
        "prior seeds, 95% t interval) of as many images decoded from sampled code sequences (regression: "
        "rollouts from a training sequence's first token: it has no distribution to sample), beside "
        "real training crops, the validation codes decoded and tokens drawn with no context (unigram)."
        f"\n\n{generated}"
    )


def write(result: dict, out: Path, settings: dict, threads_per_run: int) -> list[Path]:
    """``<out>/<name>/`` (``<variant>/seed<k>/`` for a seeded sweep's run): the figures, then
    ``result.json`` kept (``analysis.runs.keep``) under the ``settings`` that made it, with the
    threads each run had."""
    folder = out / result["name"]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, figure in figures(result).items():
        figure.savefig(folder / name, dpi=120)
        files.append(folder / name)
    # last: a result.json there means the run's files are all there (``kept``)
    record = {k: v for k, v in result.items() if k != "samples"} | {"threads_per_run": threads_per_run}
    keep(folder / "result.json", settings, record)
    return [folder / "result.json", *files]


def log_to_mlflow(result: dict, files: list[Path], root: Path, settings: dict) -> str:
    """One run of the MLflow experiment ``codes`` per tokenizer: its numbers as metrics."""
    from analysis.runs import log_study

    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers |= {f"sensitivity_digit{i}": v for i, v in enumerate(result["sensitivity"])}
    params = {"quantizer": result["quantizer"], **settings}
    return log_study("integer_codes", result["name"], params, [{"step": 0, **numbers}], files, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.integer_codes", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="run folders of trained tokenizers")
    parser.add_argument("--train-count", type=int, default=8192, help="training crops whose codes train the priors")
    parser.add_argument("--prior-steps", type=int, default=5000, help="most optimizer steps of a prior")
    parser.add_argument("--prior-seeds", type=int, default=3, help="seeds 0..n-1 of each prior")
    parser.add_argument(
        "--prior-parameters", type=int, default=0, help="every prior's size (0: the flat prior's at width 128)"
    )
    parser.add_argument("--patience", type=int, default=5, help="held-out evaluations without improvement")
    parser.add_argument("--pairs", type=int, default=PAIRS, help="token pairs for the locality correlations")
    parser.add_argument("--priors", nargs="+", default=list(PRIORS), choices=PRIORS)
    parser.add_argument(
        "--root", type=Path, default=Path("runs"), help="runs root: MLflow store; outputs in <root>/integer_codes"
    )
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs analysed at once, each in its own process with a share of the threads"
    )
    parser.add_argument(
        "--again", action="store_true", help="analyse every run, also one whose result has the same settings"
    )
    parser.add_argument("--smoke", action="store_true", help="few crops and prior steps: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if min(args.train_count, args.prior_steps, args.prior_seeds, args.patience, args.jobs) < 1 or args.pairs < 2:
        parser.error("--train-count, --prior-steps, --prior-seeds, --patience and --jobs must be >= 1, --pairs >= 2")
    # every run is checked before any is analysed: one line naming what is missing, exit 2
    missing = [str(run) for run in args.runs if not RunFolder(run).has_config()]
    unsaved = [
        str(RunFolder(run).checkpoints) for run in args.runs if not checkpoint.step_files(RunFolder(run).checkpoints)
    ]
    if missing or unsaved:
        what = (
            f"no run folder ({CONFIG_FILE}) at {', '.join(missing)}"
            if missing
            else f"no checkpoint in {', '.join(unsaved)}"
        )
        print(f"error: {what}", file=sys.stderr)
        return 2
    settings = {key: getattr(args, key) for key in ("train_count", "prior_steps", "pairs", "prior_seeds")}
    settings |= {"prior_parameters": args.prior_parameters, "patience": args.patience}
    out, recorded = args.root / "integer_codes", settings | {"priors": list(args.priors)}
    # a rerun continues: a run whose result was written with the same settings is not analysed again
    labels = [label(run) for run in args.runs]  # each reads the run's config
    reused = {} if args.again else {name: kept(out / name / "result.json", recorded) for name in labels}
    results = [result for result in reused.values() if result is not None]
    for result in results:
        print(f"reusing {out / result['name'] / 'result.json'}: the same settings (--again analyses it again)")
    todo = [run for run, name in zip(args.runs, labels, strict=True) if reused.get(name) is None]
    threads = threads_per_run(args.jobs, len(todo))
    logged = settings | {"threads_per_run": threads}
    try:
        for result in analyse_runs(todo, args.jobs, priors=tuple(args.priors), **settings):
            files = write(result, out, recorded, threads)
            if not args.no_mlflow:
                print(f"MLflow run {log_to_mlflow(result, files, args.root, logged)} (experiment integer_codes)")
            results.append(result)
    except UserError as err:  # e.g. no checkpoint of the run loads; the runs done before it are written
        print(f"error: {err}", file=sys.stderr)
        return 2
    results.sort(key=lambda r: labels.index(r["name"]))
    table = markdown(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    priors_figure(results).savefig(out / "priors.png", dpi=120)
    if not args.no_mlflow:
        from analysis.runs import log_study

        names = {"runs": ",".join(result["name"] for result in results)}
        run_id = log_study(
            "integer_codes", "table", settings | names, [], [out / "table.md", out / "priors.png"], args.root
        )
        print(f"MLflow run {run_id} (experiment integer_codes): the table and priors.png")
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
