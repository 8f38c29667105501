"""Markdown tables: the one renderer of the tables vqlab and the studies print and write
(``vqlab.report``, ``analysis.utilization``, ``analysis.decomposition``, ``analysis.integer_codes``,
``analysis.zoo``). Each caller chooses its columns and how each is rounded; ``cell`` formats one
value and ``markdown`` lays the cells out."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

MISSING = "—"  # a value that was not measured: never shown as 0


def cell(value: Any, spec: str = "", missing: str = MISSING) -> str:
    """One cell: a float formatted with ``spec`` (e.g. ``".4f"``), an int or a text as it is;
    ``None`` and NaN are ``missing``."""
    fractional = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)  # numpy's too
    if value is None or (fractional and math.isnan(value)):
        return missing
    return format(value, spec) if fractional and spec else str(value)


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """``| a | b |``, ``|---|---|`` and a line per row of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
