"""The learning-rate schedule every recipe gets from the engine: linear warm-up, then constant, then an optional
linear decay over the last part of the run.

torch's schedulers count optimiser steps, but a time-budgeted run (``max_minutes``) does not know its number of
steps in advance. So the decay factor is a function of the share of the run done, which the trainer measures as
the larger of ``step / max_steps`` and ``elapsed / max_minutes`` (agreed by all processes); the warm-up counts
steps. The trainer multiplies both into every trained model's lr before each step (:func:`lr_factor`).
"""

from __future__ import annotations

import torch


def linear_decay_factor(progress: float, start: float, final: float) -> float:
    """1 until ``progress`` reaches ``start``, then linear down to ``final`` at ``progress`` = 1 (and after)."""
    if progress <= start or start >= 1.0:
        return 1.0
    done = min(1.0, (progress - start) / (1.0 - start))
    return 1.0 - (1.0 - final) * done


def linear_warmup_factor(step: int, warmup_steps: int) -> float:
    """``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (0-based ``step``), then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def lr_factor(step: int, progress: float, warmup_steps: int, decay_start: float, decay_final: float) -> float:
    """The share of each model's initial lr used at ``step``: warm-up times decay."""
    return linear_warmup_factor(step, warmup_steps) * linear_decay_factor(progress, decay_start, decay_final)


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """lr = initial_lr * factor for every param group; ``initial_lr`` is recorded on first use (as torch's
    schedulers do) and travels with the optimiser's state dict, so a resumed run scales the same base."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def base_learning_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each parameter group's undecayed lr: ``initial_lr`` once :func:`scale_learning_rates` has run, else ``lr``."""
    return [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
