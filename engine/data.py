"""An endless, resumable stream of batches over a prepared dataloader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from accelerate import Accelerator
from torch.utils.data import DataLoader


class BatchStream:
    """Cycles over epochs and remembers (epoch, batch position) so a resumed run continues mid-epoch.

    Shuffling must come from the dataloader's own seeded sampler (the engine enables accelerate's seedable
    sampler), so an epoch's order depends only on the seed and the epoch number.
    """

    def __init__(self, accelerator: Accelerator, dataloader: DataLoader) -> None:
        self.accelerator = accelerator
        self.dataloader = dataloader
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator[Any] | None = None

    def _start_epoch(self) -> None:
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(self.epoch)
        loader = self.dataloader
        if self.position:
            loader = self.accelerator.skip_first_batches(self.dataloader, self.position)
        self._iterator = iter(loader)

    def __next__(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self.position = 0
            self._start_epoch()
            try:
                batch = next(self._iterator)
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
