"""Sample grids: PNG files for a person to look at, and the same grid for the tracker."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile ``[N, C, H, W]`` images in [-1, 1] into one uint8 ``[H', W', C]`` array (C = 1 or 3)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"make_grid expects [N, C, H, W] with C in (1, 3, 4), got shape {tuple(images.shape)}"
        )
    images = images[:, :3].detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    if upscale > 1:
        images = images.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    grid = make_grid(images, nrow=nrow, upscale=upscale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
