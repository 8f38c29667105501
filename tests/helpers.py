import json
from pathlib import Path

import torch

from vqlab.models import AutoencoderOutput
from vqlab.quantizers import QuantizerOutput


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric_at(run_dir: Path, key: str, step: int) -> float:
    return next(row[key] for row in read_metrics(run_dir) if row["step"] == step and key in row)


def model_output(
    reconstruction: torch.Tensor | None = None, codes: torch.Tensor | None = None, latents: torch.Tensor | None = None
) -> AutoencoderOutput:
    """A model output holding only what the evaluator under test reads."""
    return AutoencoderOutput(reconstruction, QuantizerOutput(z_q=latents, codes=codes), latents)
