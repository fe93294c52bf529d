"""What a recipe hands the engine: its trained and frozen models, its data, and one loss per phase.

A *phase* is one optimiser step of one trained model. SiD has two phases per iteration (fake score, then
generator); plain fine-tuning has one. The engine runs the phases in the order ``Recipe.phases`` returns,
accumulating gradients over micro-batches inside each phase and syncing only the phase's own model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from engine.trainer import Trainer


@dataclass
class TrainedModel:
    """A model the engine trains: its optimiser, optional LR scheduler and optional EMA (half-life in samples).

    ``parameters`` names the trained subset (default: every parameter with ``requires_grad``). With
    ``sync="all_reduce"`` the module is not wrapped for DDP: the engine averages the trained parameters'
    gradients across processes itself after the last micro-batch. Use it when several trained models share one
    module (adapters on one frozen base); the EMA then covers only ``parameters``. ``ema_device`` keeps the EMA
    elsewhere (e.g. "cpu", freeing a model copy of accelerator memory; None: beside the model).
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any | None = None
    ema_halflife_images: float | None = None
    ema_rampup_ratio: float | None = 0.05
    ema_device: str | None = None
    parameters: list[str] | None = None
    sync: Literal["wrap", "all_reduce"] = "wrap"


@dataclass
class RecipeParts:
    trained: dict[str, TrainedModel]
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    dataloader: DataLoader | None = None


LossOutput = torch.Tensor | tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]


class Recipe(ABC):
    """Supplies models, data and losses; never loops, syncs, steps or checkpoints (the engine does)."""

    @abstractmethod
    def setup(self, trainer: Trainer) -> RecipeParts:
        """Build models, optimisers and the dataloader (unprepared; the engine prepares them)."""

    def phases(self, step: int) -> list[str]:
        """Names of trained models to step, in order, at ``step`` (default: each once, in setup order)."""
        return list(self._trained_names)

    @abstractmethod
    def loss(self, phase: str, batch: Any, models: Mapping[str, nn.Module]) -> LossOutput:
        """Loss of one micro-batch for ``phase``; optionally with a dict of extra scalars to log."""

    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """Periodic evaluation (every ``eval_every`` steps and at the end); returns scalars to log."""
        return {}

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Called on every process after the final evaluation, before the final checkpoint (export here)."""
        return None

    #: whether the recipe runs under the engine's FSDP (engine/fsdp.py): every call of a trained or frozen network
    #: happens on all processes together (a sharded network gathers its parameters collectively), and evaluation
    #: and export read EMAs or gathered states, never a sharded network on the main process alone
    supports_fsdp: bool = False

    # set by the engine after setup
    _trained_names: tuple[str, ...] = ()
