"""A tiny Fashion-MNIST folder (idx.gz files in Debian's layout) for fast tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_tiny_fashion_mnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Blobs of class-dependent brightness on black, every class present in each split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            size = 4 + c
            images[i, 14 - size : 14 + size, 14 - size : 14 + size] = 100 + 15 * c
        images = np.clip(images + rng.integers(0, 20, images.shape), 0, 255).astype(np.uint8)
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", images, 2051)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels.astype(np.uint8), 2049)
    return root
