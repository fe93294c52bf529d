"""Seeding and determinism helpers shared by every recipe."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
from accelerate.utils import set_seed

T = TypeVar("T")


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


def seed_setup_then_processes(
    seed: int, process_index: int, setup: Callable[[], T], deterministic: bool = False
) -> T:
    """Run ``setup`` seeded with ``seed`` on EVERY process, then give each process its own stream.

    Whatever setup draws (a newly created classification head, peft's random LoRA A, any weight the base
    checkpoint does not hold) is then identical on every process, as training and LoRA-GA's gradient estimate
    need; the noise and data drawn after setup differ per process. Process 0 keeps its stream (``seed`` from the
    start, as a 1-process run always had); process ``i > 0`` is re-seeded with ``seed + i`` after setup.
    """
    seed_everything(seed, 0, deterministic)
    result = setup()
    if process_index != 0:
        seed_everything(seed, process_index, deterministic)
    return result


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator, for noise that must not depend on (or disturb) the global RNG stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@contextlib.contextmanager
def training_rng_kept() -> Iterator[None]:
    """Run the block without moving the global random streams (python, numpy, torch CPU and CUDA).

    Evaluation and export draw random numbers (sampling noise, a new model's initial weights); around them the
    training stream is put back, so a run that evaluates at its end and is resumed from that checkpoint draws
    what an uninterrupted run that did not evaluate there draws (exact resume).
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
