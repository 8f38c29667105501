"""``TrainState``: everything a checkpoint restores, saved and loaded as one object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqlab import checkpoint, distributed
from vqlab.errors import CheckpointError, ResumeError
from vqlab.runtime import ModelEMA, rng_state, set_rng_state


class TrainState:
    """Model, optimizer, schedule, model EMA, adversary and its optimizer, the step, the data
    position (``(epoch, batch)`` of the next batch), every rank's RNG state, and (written by the
    run's lifecycle) how many rows of ``metrics.jsonl`` came before the checkpoint.

    ``state_dict`` gathers the RNG states of all ranks, so every rank calls it together.
    ``load_state_dict`` restores everything but the RNG, which ``restore_rng`` sets right before
    the training loop: whatever runs between (validation passes, new data iterators) must not
    shift what the loop draws."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        ema: ModelEMA | None = None,
        adversary: torch.nn.Module | None = None,
        disc_optimizer: torch.optim.Optimizer | None = None,
    ):
        self.model, self.optimizer, self.schedule, self.device = model, optimizer, schedule, device
        self.ema, self.adversary, self.disc_optimizer = ema, adversary, disc_optimizer
        self.step = 0
        self.position = (0, 0)
        self.records: int | None = None  # rows of metrics.jsonl written before the checkpoint
        self._rng: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self.step,
            "position": list(self.position),
            "world_size": distributed.world_size(),
            "rng": distributed.all_gather_objects(rng_state(self.device)),
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        if self.adversary is not None:
            state["adversary"] = self.adversary.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != distributed.world_size():
            raise ResumeError(
                f"the checkpoint was written by {state['world_size']} ranks; resume it with as many "
                f"(this is {distributed.world_size()})"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        if self.adversary is not None:
            self.adversary.load_state_dict(state["adversary"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.step, self.position = int(state["step"]), tuple(state["position"])
        self.records = state.get("records")
        self._rng = state["rng"][distributed.rank()]

    def restore_rng(self) -> None:
        """Set the RNG state a loaded checkpoint carried (nothing for a fresh run)."""
        if self._rng is not None:
            set_rng_state(self._rng, self.device)
            self._rng = None


@dataclass(frozen=True)
class SavedWeights:
    """What a checkpoint holds for a model rebuilt outside training (evaluation, the studies): the
    model's weights, its weight EMA's when the run kept one, and the step."""

    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    step: int

    @classmethod
    def read(cls, path: Path, map_location: str | torch.device = "cpu") -> SavedWeights:
        return cls.of(path, checkpoint.load(path, map_location))

    @classmethod
    def of(cls, path: Path, state: dict[str, Any]) -> SavedWeights:
        if "model" not in state or "step" not in state:
            raise CheckpointError(f"{path} is not a vqlab checkpoint (it holds no model weights and step)")
        return cls(Path(path), state["model"], state.get("ema"), int(state["step"]))

    def load_into(self, model: torch.nn.Module, ema: bool = False) -> torch.nn.Module:
        """``model`` with these weights (the EMA's with ``ema``); weights of another architecture
        are an error naming the file."""
        try:
            model.load_state_dict(self.ema if ema else self.model)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(
                f"{self.path} holds weights of another model than the run's config: {first}"
            ) from None
        return model
