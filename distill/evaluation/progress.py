"""Progress for the long evaluation steps: a tqdm bar counted in samples, and one-line notes on stderr.

Notes and bars go to stderr (through ``tqdm.write`` so they do not tear an open bar), which keeps stdout free
for results such as ``onestep eval``'s JSON line.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm.auto import tqdm

SAMPLES_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} samples [{elapsed}<{remaining}, {rate_fmt}]"


def say(message: str) -> None:
    """One line on stderr that does not break an open progress bar."""
    tqdm.write(message, file=sys.stderr)


def threads_note(device: torch.device | str | None = None) -> str:
    """'8 threads' on CPU (what torch will use), else the device name."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)


def samples_bar(total: int, desc: str, enabled: bool = True, leave: bool = True) -> tqdm:
    """A bar over ``total`` samples (stderr; ``enabled=False`` keeps it silent)."""
    return tqdm(
        total=total,
        desc=desc,
        disable=not enabled,
        leave=leave,
        bar_format=SAMPLES_FORMAT,
        unit=" samples",
        file=sys.stderr,
    )


class ProgressDenoiser:
    """Wraps a denoiser so that its ``nfe`` calls on a batch advance ``bar`` by that batch's size.

    A multi-step ODE sampler calls the denoiser ``nfe`` times per batch, so the bar moves during a batch
    (by whole samples: call k of a batch of b adds ``b*k // nfe - b*(k-1) // nfe``) instead of once at its
    end, without changing a single number the sampler computes. Attributes the samplers read
    (``sigma_min``, ``in_channels``, ``parameters``...) are the wrapped denoiser's.
    """

    def __init__(self, denoiser: Any, bar: tqdm, nfe: int) -> None:
        self.denoiser, self.bar, self.nfe = denoiser, bar, max(int(nfe), 1)
        self.calls = 0

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.denoiser(x, *args, **kwargs)
        b, k = x.shape[0], self.calls % self.nfe + 1
        self.calls += 1
        self.bar.update(b * k // self.nfe - b * (k - 1) // self.nfe)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.denoiser, name)
