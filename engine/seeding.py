"""Seeding and determinism helpers shared by every recipe."""

from __future__ import annotations

import os

import torch
from accelerate.utils import set_seed


def seed_everything(seed: int, process_index: int = 0, deterministic: bool = False) -> int:
    """Seed python, numpy and torch with ``seed + process_index`` so processes draw different noise.

    Returns the seed actually used. With ``deterministic`` torch's deterministic algorithms are switched on
    (needs ``CUBLAS_WORKSPACE_CONFIG`` on CUDA, which is set here if missing).
    """
    used = seed + process_index
    set_seed(used)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
    return used


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator, for noise that must not depend on (or disturb) the global RNG stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
