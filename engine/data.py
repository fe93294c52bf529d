"""An endless, resumable stream of batches over a prepared dataloader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader


class BatchStream:
    """Cycles over epochs and remembers (epoch, batch position) so a resumed run continues mid-epoch.

    Shuffling must come from the dataloader's own seeded sampler (the engine enables accelerate's seedable
    sampler), so an epoch's order depends only on the seed and the epoch number.
    """

    def __init__(self, accelerator: Accelerator, dataloader: DataLoader, seed: int = 0) -> None:
        self.accelerator = accelerator
        self.dataloader = dataloader
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator[Any] | None = None
        self._fresh = False

    def _start_epoch(self) -> None:
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(self.epoch)
        loader = self.dataloader
        if self.position:
            loader = self.accelerator.skip_first_batches(self.dataloader, self.position)
        self._iterator = iter(loader)
        self._fresh = True

    def _next(self) -> Any:
        """The iterator's next batch. Its first batch starts torch's DataLoader iterator, which draws the
        workers' base seed from the global torch RNG: a resumed run starts an iterator mid-epoch where an
        uninterrupted run did not, so that draw shifted every later random number of the loss (noise,
        timesteps). The first fetch runs on a forked CPU RNG seeded by (seed, epoch, process) instead: the
        training RNG is untouched and worker seeds still differ per epoch and process."""
        if not self._fresh:
            return next(self._iterator)
        self._fresh = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + self.accelerator.process_index)
            return next(self._iterator)

    def __next__(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = self._next()
        except StopIteration:
            self.epoch += 1
            self.position = 0
            self._start_epoch()
            try:
                batch = self._next()
            except StopIteration:
                raise RuntimeError(
                    "The dataloader yields no batches (dataset smaller than one batch?)"
                ) from None
        self.position += 1
        return batch

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._iterator = None
