"""Learning-rate decay over the run's progress, for runs that end on a step count or on a time budget.

torch's schedulers count optimiser steps, but a time-budgeted run (``max_minutes``) does not know its number of
steps in advance. Here the factor is a function of the share of the run done, which the trainer measures as the
larger of ``step / max_steps`` and ``elapsed / max_minutes`` (agreed by all processes), and sets before each
step.
"""

from __future__ import annotations

import torch


def linear_decay_factor(progress: float, start: float, final: float) -> float:
    """1 until ``progress`` reaches ``start``, then linear down to ``final`` at ``progress`` = 1 (and after)."""
    if progress <= start or start >= 1.0:
        return 1.0
    done = min(1.0, (progress - start) / (1.0 - start))
    return 1.0 - (1.0 - final) * done


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """lr = initial_lr * factor for every param group; ``initial_lr`` is recorded on first use (as torch's
    schedulers do) and travels with the optimiser's state dict, so a resumed run scales the same base."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
