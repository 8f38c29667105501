"""Integer-code behaviour: ``python -m analysis.integer_codes --runs runs/<exp>/<run> ...``.

The seed study asked: "Is it important to convert it into an integer, rather than its corresponding
embedding?" For each trained tokenizer (its newest checkpoint, on its validation crops unless said
otherwise):

- ``digit_entropy_{i}`` (bits) of each digit and the mutual information between every two digits
  (``mutual_information``, from their joint histogram; 0 for independent digits);
- locality: Spearman correlation, over random pairs of held-out tokens, of a code distance
  (|Δ flat index|, digit L1, Hamming) with the distance of the codes' embeddings (``decode``) and
  with the difference of the images decoded from them (every token of an image set to the code);
- per-digit sensitivity: the mean absolute change of the decoded image (on [0, 1]) when one digit of
  one token moves by ±1;
- stability: the share of codes that change under Gaussian pixel noise (``NOISE`` on [-1, 1]
  images) and under a one-pixel shift;
- integer versus embedding: a small causal transformer prior over the images' code sequences
  (raster order), trained three ways on the training crops' codes and measured on the validation
  crops' — ``flat``: one embedding per flat index and a softmax over all K codes; ``factorised``: a
  sum of per-digit embeddings and one softmax head per digit (the digits of a token predicted
  independently given the past, as in Open-MAGVIT2's token factorisation); ``regression``: the next
  token's embedding regressed (MSE) and quantized afterwards to the code of the nearest embedding. Held-out bits
  per token (``flat``, ``factorised``), next-token accuracy, and the L1 of the images decoded from the
  teacher-forced predictions (all three).
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

from vqlab import checkpoint, tables
from vqlab.codes import digits_to_index, perplexity
from vqlab.errors import UserError
from vqlab.runfolder import CONFIG_FILE, RunFolder

NOISE = 2 / 255 * 2  # two grey levels of an 8-bit image, on [-1, 1]
PAIRS = 4096  # random token pairs for the locality correlations
PRIORS = ("flat", "factorised", "regression")


# --- statistics of the digits ----------------------------------------------------------------------
def entropy_bits(counts: torch.Tensor) -> float:
    return math.log2(perplexity(counts).item())


def digit_entropies(codes: torch.Tensor, radices: tuple[int, ...]) -> list[float]:
    """``(M, G)`` digits -> the entropy in bits of each digit's histogram."""
    return [entropy_bits(torch.bincount(codes[:, i], minlength=r)) for i, r in enumerate(radices)]


def mutual_information(codes: torch.Tensor, radices: tuple[int, ...]) -> np.ndarray:
    """``(G, G)`` plug-in mutual information in bits between every two digits (H on the diagonal)."""
    groups = len(radices)
    result = np.zeros((groups, groups))
    single = digit_entropies(codes, radices)
    for i in range(groups):
        result[i, i] = single[i]
        for j in range(i + 1, groups):
            joint = torch.bincount(codes[:, i] * radices[j] + codes[:, j], minlength=radices[i] * radices[j])
            result[i, j] = result[j, i] = single[i] + single[j] - entropy_bits(joint)
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
class Prior(nn.Module):
    """A causal transformer over code sequences, with the input and output of one of ``PRIORS``."""

    def __init__(
        self, kind: str, radices: tuple[int, ...], length: int, embed_dim: int = 0, width: int = 128, layers: int = 2
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
        elif kind == "factorised":
            self.inputs = nn.ModuleList(nn.Embedding(r, width) for r in radices)
            self.head = nn.Linear(width, sum(radices))
        else:
            self.inputs = nn.Linear(embed_dim, width)
            self.head = nn.Linear(width, embed_dim)
        block = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)

    def embed_inputs(self, codes: torch.Tensor, latents: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "flat":
            return self.inputs(digits_to_index(codes, self.radices))
        if self.kind == "factorised":
            return sum(table(codes[..., i]) for i, table in enumerate(self.inputs))
        return self.inputs(latents)

    def forward(self, codes: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, G)`` codes (and ``(B, L, D)`` embeddings for ``regression``) -> the prediction of
        each token from the ones before it: logits ``(B, L, K)``, per-digit logits ``(B, L, sum
        radices)``, or embeddings ``(B, L, D)``."""
        x = self.embed_inputs(codes, latents)[:, :-1]  # (B, L-1, W): token t is input to predict t+1
        x = torch.cat([self.start.expand(len(codes), 1, -1), x], dim=1) + self.position  # (B, L, W)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.head(self.body(x, mask=mask, is_causal=True))

    def loss(self, output: torch.Tensor, codes: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Nats per token (``flat``, ``factorised``: summed over the digits) or the MSE (``regression``)."""
        if self.kind == "flat":
            return F.cross_entropy(output.flatten(0, 1), digits_to_index(codes, self.radices).flatten())
        if self.kind == "factorised":
            pieces = output.split(list(self.radices), dim=-1)
            return sum(F.cross_entropy(p.flatten(0, 1), codes[..., i].flatten()) for i, p in enumerate(pieces))
        return F.mse_loss(output, latents)

    def predict(self, output: torch.Tensor, nearest_code=None) -> torch.Tensor:
        """The predicted codes ``(B, L, G)``: the most likely code, or the code nearest the regression."""
        if self.kind == "flat":
            from vqlab.codes import index_to_digits

            return index_to_digits(output.argmax(-1), self.radices)
        if self.kind == "factorised":
            return torch.stack([p.argmax(-1) for p in output.split(list(self.radices), dim=-1)], dim=-1)
        return nearest_code(output)


@dataclass
class PriorResult:
    kind: str
    bits_per_token: float  # NaN for regression
    accuracy: float
    decoded_l1: float


def train_prior(
    kind: str,
    tokenizer: Tokenizer,
    train_codes: torch.Tensor,
    held_out_codes: torch.Tensor,
    held_out_images: torch.Tensor,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> PriorResult:
    """Fit one prior on ``(N, L, G)`` training code sequences; measure it on the held-out ones."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    radices = tokenizer.radices
    embed_dim = tokenizer.embed(train_codes[:1, 0]).shape[-1]
    prior = Prior(kind, radices, train_codes.shape[1], embed_dim)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)

    def latents_of(codes: torch.Tensor) -> torch.Tensor | None:
        return tokenizer.embed(codes.flatten(0, 1)).reshape(*codes.shape[:2], -1) if kind == "regression" else None

    for _ in tqdm(range(steps), desc=f"prior {kind}", disable=not progress):
        batch = train_codes[torch.randint(len(train_codes), (batch_size,), generator=generator)]
        latents = latents_of(batch)
        loss = prior.loss(prior(batch, latents), batch, latents)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    prior.eval()
    with torch.no_grad():
        latents = latents_of(held_out_codes)
        output = prior(held_out_codes, latents)
        bits = math.nan if kind == "regression" else prior.loss(output, held_out_codes).item() / math.log(2)
        predicted = prior.predict(output, tokenizer.nearest_code)
        accuracy = (predicted == held_out_codes).all(-1).float().mean().item()
        decoded = tokenizer.decode(predicted)
        l1 = float((decoded - held_out_images).abs().mean() / 2)
    return PriorResult(kind, bits, accuracy, l1)


# --- one run, many runs, the command line -------------------------------------------------------------
SMOKE = {"train_count": 256, "prior_steps": 20, "pairs": 256}  # seconds: --smoke and the notebook's smoke


def analyse_run(
    run_dir: str | Path,
    train_count: int = 8192,
    prior_steps: int = 300,
    pairs: int = PAIRS,
    priors: tuple[str, ...] = PRIORS,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Every measurement of the module docstring for one run: a flat dict of numbers, plus
    ``mutual_information`` (a G x G array) and ``sensitivity`` (a list per digit)."""
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
    result: dict = {"name": Path(run_dir).name, "quantizer": cfg.quantizer.name, "codebook_size": math.prod(radices)}
    result |= {f"digit_entropy_{i}": h for i, h in enumerate(digit_entropies(tokens, radices))}
    information = mutual_information(tokens, radices)
    off_diagonal = information[~np.eye(len(radices), dtype=bool)]
    result["mean_pairwise_mi"] = float(off_diagonal.mean()) if off_diagonal.size else math.nan
    result |= locality(tokens, radices, tokenizer.embed, tokenizer.image_of, pairs)
    result |= stability(tokenizer, images, codes)
    result["sensitivity"] = sensitivity(tokenizer, codes)
    result["mutual_information"] = information
    train_codes = tokenizer.encode(crops(cfg, "train", train_count, device))
    for kind in priors:
        prior = train_prior(kind, tokenizer, train_codes, codes, images, steps=prior_steps, progress=progress)
        result |= {f"prior_{kind}_bits": prior.bits_per_token, f"prior_{kind}_accuracy": prior.accuracy}
        result[f"prior_{kind}_decoded_l1"] = prior.decoded_l1
    result["log2_codebook_size"] = math.log2(result["codebook_size"])
    return result


def figures(result: dict) -> dict:
    """``mutual_information.png`` (digits x digits, bits) and ``sensitivity.png`` (per digit)."""
    from matplotlib.figure import Figure

    made = {}
    information = result["mutual_information"]
    figure = Figure(figsize=(5, 4), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(information, cmap="viridis")
    figure.colorbar(image, ax=ax, label="bits")
    ax.set(xlabel="digit", ylabel="digit", title=f"{result['name']}: mutual information (entropy on the diagonal)")
    made["mutual_information.png"] = figure
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    ax = figure.subplots()
    ax.bar(range(len(result["sensitivity"])), result["sensitivity"])
    ax.set(xlabel="digit", ylabel="mean |Δ image| on [0, 1]", title=f"{result['name']}: one digit ±1 on one token")
    made["sensitivity.png"] = figure
    return made


SCALARS = ("quantizer", "codebook_size", "mean_pairwise_mi", "changed_under_noise", "changed_under_shift")


def markdown(results: list[dict]) -> str:
    """The headline numbers per run: prior bits per token and accuracy, locality, stability."""
    columns = ["name", "quantizer", "log2 K", "flat bits", "factorised bits", "flat acc", "factorised acc"]
    columns += ["regression acc", "regression L1", "index~embedding", "mean MI", "noise", "shift"]
    keys = [None, "quantizer", "log2_codebook_size", "prior_flat_bits", "prior_factorised_bits"]
    keys += ["prior_flat_accuracy", "prior_factorised_accuracy", "prior_regression_accuracy"]
    keys += ["prior_regression_decoded_l1", "locality_index_vs_embedding", "mean_pairwise_mi"]
    keys += ["changed_under_noise", "changed_under_shift"]
    cells = (
        [result["name"]] + [tables.cell(result.get(key, math.nan), ".4g") for key in keys[1:]] for result in results
    )
    return tables.markdown(columns, cells)


def write(result: dict, out: Path) -> list[Path]:
    """``<out>/<name>/``: ``result.json`` and the figures."""
    import json

    folder = out / result["name"]
    folder.mkdir(parents=True, exist_ok=True)
    plain = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
    (folder / "result.json").write_text(json.dumps(plain, indent=2) + "\n")
    files = [folder / "result.json"]
    for name, figure in figures(result).items():
        figure.savefig(folder / name, dpi=120)
        files.append(folder / name)
    return files


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
    parser.add_argument("--prior-steps", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=PAIRS, help="token pairs for the locality correlations")
    parser.add_argument("--priors", nargs="+", default=list(PRIORS), choices=PRIORS)
    parser.add_argument(
        "--root", type=Path, default=Path("runs"), help="runs root: MLflow store; outputs in <root>/integer_codes"
    )
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="few crops and prior steps: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.train_count < 1 or args.prior_steps < 1 or args.pairs < 2:
        parser.error("--train-count and --prior-steps must be >= 1, --pairs >= 2")
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
    settings = {"train_count": args.train_count, "prior_steps": args.prior_steps, "pairs": args.pairs}
    results = []
    for run in args.runs:
        try:
            result = analyse_run(run, args.train_count, args.prior_steps, args.pairs, tuple(args.priors))
        except UserError as err:  # e.g. no checkpoint of the run loads
            print(f"error: {err}", file=sys.stderr)
            return 2
        files = write(result, args.root / "integer_codes")
        if not args.no_mlflow:
            print(f"MLflow run {log_to_mlflow(result, files, args.root, settings)} (experiment integer_codes)")
        results.append(result)
    table = markdown(results)
    (args.root / "integer_codes").mkdir(parents=True, exist_ok=True)
    (args.root / "integer_codes" / "table.md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.root / 'integer_codes'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
