import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric_at(run_dir: Path, key: str, step: int) -> float:
    return next(row[key] for row in read_metrics(run_dir) if row["step"] == step and key in row)
