"""Checkpoints: written atomically (temporary file + ``os.replace``), read with ``weights_only``.

A run's ``checkpoints/`` folder holds ``step_0000100.pt`` files (the newest ``keep`` of them) and
``last``, a one-line pointer to the newest, itself replaced atomically. A crash at any moment
leaves the previous checkpoint and pointer intact; the temporary file a crash leaves behind is
removed by the next save. Files are ordered by the step in their name, not as text, so a run past
step 9,999,999 (eight digits) still prunes its oldest.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from vqlab.errors import CheckpointError, MissingFileError

POINTER = "last"
STEP_FILE = re.compile(r"step_(\d+)\.pt")


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """A crash at any point leaves either the previous file or the new one, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved at ``path``; a missing, truncated or foreign file is a one-line error naming it."""
    if not Path(path).is_file():
        raise MissingFileError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises a different type for each way a file can be broken
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a vqlab checkpoint (it holds a {type(state).__name__})")
    return state


def step_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:07d}.pt"


def step_files(folder: Path) -> list[Path]:
    """The ``step_*.pt`` files in ``folder``, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("step_*.pt") if (m := STEP_FILE.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def remove_temporaries(folder: Path) -> None:
    """Drop the temporary files of saves that never finished (a process killed mid-write)."""
    for tmp in Path(folder).glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def save_step(state: dict[str, Any], folder: Path, step: int, keep: int) -> Path:
    """Write ``step_<step>.pt``, point ``last`` at it, then drop all but the newest ``keep``."""
    path = step_path(folder, step)
    remove_temporaries(folder)
    save_atomic(state, path)
    write_text_atomic(path.name + "\n", folder / POINTER)
    for old in step_files(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_valid(folder: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads: the ``last`` pointer's target first, then older steps.
    A corrupt or unreadable file is skipped with a warning; ``None`` if nothing loads."""
    candidates = step_files(folder)[::-1]
    pointer = folder / POINTER
    if pointer.is_file():
        target = folder / pointer.read_text().strip()
        candidates = [target] + [c for c in candidates if c != target]
    for path in candidates:
        try:
            return path, load(path, map_location)
        except Exception as err:  # any unreadable file is skipped, whatever broke it
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(err).__name__}: {err}", stacklevel=2)
    return None


def set_aside(folder: Path) -> Path | None:
    """Move every checkpoint (and the pointer) into ``folder/discarded-<time>/``, out of the way of
    a run that starts again from step 0 but without deleting anything; ``None`` if there was none."""
    files = step_files(folder)
    if not files:
        return None
    aside = Path(folder) / f"discarded-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in [*files, Path(folder) / POINTER]:
        if path.exists():
            os.replace(path, aside / path.name)
    return aside
