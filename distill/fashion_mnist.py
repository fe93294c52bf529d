"""Fashion-MNIST (70k 28x28 grayscale product photos, 10 classes, MIT licence) as a ``datasets.Dataset``, read
offline from Debian's ``dataset-fashion-mnist`` package, and the captions the text-to-image teachers train on.

The package installs the original idx files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``) under
:data:`FASHION_MNIST_DIR`; they are parsed with numpy (no torchvision) and written once into ``datasets``' own
Arrow cache through :meth:`datasets.Dataset.from_generator`, whose cache key covers the generator's code and its
arguments (the files' paths, sizes and modification times), so a second load memory-maps the Arrow file in
well under a second and a changed file is re-read.

Captions come in two disjoint sets: :func:`caption_templates` ``("train")`` are the wordings a teacher trains
on, ``("heldout")`` are paraphrases that never appear in training, so prompt alignment can also be measured on
unseen wording. Each class has one or more names (synonyms such as "sneaker"/"trainer"); a caption is a
template filled with one name.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import datasets
import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
#: the words a caption may use for each class (the first is the canonical name in :data:`FASHION_CLASSES`,
#: except that "t-shirt/top" reads better in a sentence as "t-shirt")
CLASS_NAMES: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "top", "tee"),
    ("trouser", "pair of trousers", "pair of pants"),
    ("pullover", "sweater", "jumper"),
    ("dress",),
    ("coat", "jacket"),
    ("sandal",),
    ("shirt", "button-up shirt"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag"),
    ("ankle boot", "boot"),
)
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {name}",
    "a {name}, product photo",
    "a black and white picture of a {name}",
    "a grayscale photo of a {name}",
    "a {name} on a plain background",
    "{name}",
)
#: paraphrases never used in training (for prompt alignment on unseen wording)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "an image showing a {name}",
    "a small monochrome snapshot of one {name}",
    "here is a {name}",
    "catalogue picture: {name}",
)
IMAGE_SHAPE = (28, 28)
INSTALL_HINT = (
    "install Debian's package: `apt-get install -y dataset-fashion-mnist` (as root; `sudo apt-get ...` otherwise). "
    "Without root, download the package with `apt-get download dataset-fashion-mnist`, unpack it with "
    "`dpkg -x dataset-fashion-mnist_*.deb DIR` and pass root=DIR/usr/share/datasets/fashion-mnist"
)
_FILES = {"train": "train", "test": "t10k"}
_IDX_MAGIC = {1: 2049, 3: 2051}  # labels (ndim 1) / images (ndim 3), unsigned bytes

Split = Literal["train", "test"]


def fashion_mnist_features() -> datasets.Features:
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_CLASSES))}
    )


def _paths(split: str, root: Path) -> tuple[Path, Path]:
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stem = _FILES[split]
    images, labels = root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (images, labels) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)}; {INSTALL_HINT}")
    return images, labels


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """One gzipped idx file (the original MNIST format: big-endian magic, dimensions, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != _IDX_MAGIC[ndim]:
        raise ValueError(
            f"{path}: idx magic {int(header[0])}, expected {_IDX_MAGIC[ndim]} for a {ndim}-d uint8 array"
        )
    shape = tuple(int(d) for d in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def load_fashion_mnist_arrays(split: Split, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 N x 28 x 28, labels int64 N)`` straight from the idx files."""
    images_path, labels_path = _paths(split, Path(root) if root is not None else FASHION_MNIST_DIR)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1).astype(np.int64)
    if images.shape[1:] != IMAGE_SHAPE or len(images) != len(labels):
        raise ValueError(f"{images_path}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def _generate(images_path: str, labels_path: str, stamp: tuple) -> Iterator[dict]:
    """Rows for ``Dataset.from_generator`` (``stamp`` is unused: it is in the cache key, so a changed file
    re-runs the generator)."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    for image, label in zip(images, labels):
        yield {"image": image, "label": int(label)}


def load_fashion_mnist(
    split: Split, root: str | Path | None = None, cache_dir: str | Path | None = None
) -> datasets.Dataset:
    """The ``train`` (60,000) or ``test`` (10,000) split with columns ``image`` (PIL "L" 28x28) and ``label``
    (``ClassLabel`` over :data:`FASHION_CLASSES`). ``root`` defaults to Debian's folder; the first call per
    split writes ``datasets``' Arrow cache (``cache_dir``, default ``HF_DATASETS_CACHE``), later calls reuse it."""
    images_path, labels_path = _paths(split, Path(root) if root is not None else FASHION_MNIST_DIR)
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (images_path, labels_path))
    return datasets.Dataset.from_generator(
        _generate,
        features=fashion_mnist_features(),
        gen_kwargs={
            "images_path": str(images_path.resolve()),
            "labels_path": str(labels_path.resolve()),
            "stamp": stamp,
        },
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        split=datasets.Split.TRAIN if split == "train" else datasets.Split.TEST,
    )


def load_fashion_mnist_pixels(
    split: Split, size: int = 32, root: str | Path | None = None
) -> datasets.Dataset:
    """The split as the teachers saw it, for recipes that take real images (SiDA's ``real_data``, LoRA data):
    ``pixel_values`` (1 x ``size`` x ``size`` float32 in [-1, 1], padded as :func:`pixel_values` pads),
    ``label`` and ``text``, a training caption of the row's class (the ``i``-th of :func:`all_captions` for row
    ``i``, so every wording occurs and the column is the same on every load)."""
    images, labels = load_fashion_mnist_arrays(split, root)
    captions = [caption(int(c), i) for i, c in enumerate(labels)]
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(1, size, size), dtype="float32"),
            "label": datasets.ClassLabel(names=list(FASHION_CLASSES)),
            "text": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {"pixel_values": pixel_values(images, size), "label": labels, "text": captions}, features=features
    )


# --- captions -----------------------------------------------------------------------------------------------
def caption_templates(split: Literal["train", "heldout"] = "train") -> tuple[str, ...]:
    """The templates (with a ``{name}`` slot) of the training or the held-out wording."""
    if split == "train":
        return TRAIN_TEMPLATES
    if split == "heldout":
        return HELDOUT_TEMPLATES
    raise ValueError(f"caption split must be 'train' or 'heldout', got {split!r}")


def _article(text: str) -> str:
    """'a' -> 'an' before a vowel ("an ankle boot"), and no article before plurals like 'pair of' (kept)."""
    words = text.split(" ")
    out = list(words)
    for i, w in enumerate(words[:-1]):
        if w.lower() == "a" and words[i + 1][:1].lower() in "aeiou":
            out[i] = "an" if w == "a" else "An"
    return " ".join(out)


def all_captions(label: int, heldout: bool = False) -> tuple[str, ...]:
    """Every caption of one class in one wording set (templates x names, in a fixed order)."""
    if not 0 <= int(label) < len(FASHION_CLASSES):
        raise ValueError(f"label must be in [0, {len(FASHION_CLASSES)}), got {label}")
    templates = caption_templates("heldout" if heldout else "train")
    return tuple(_article(t.format(name=n)) for t in templates for n in CLASS_NAMES[int(label)])


def caption(label: int, rng_or_index: np.random.Generator | int, heldout: bool = False) -> str:
    """One caption of class ``label``: drawn uniformly with a numpy ``Generator``, or the ``index``-th (modulo
    the count) of :func:`all_captions` for deterministic prompts."""
    options = all_captions(label, heldout)
    if isinstance(rng_or_index, np.random.Generator):
        return options[int(rng_or_index.integers(len(options)))]
    return options[int(rng_or_index) % len(options)]


def class_prompts(heldout: bool = False, index: int = 0) -> list[str]:
    """One prompt per class (the ``index``-th caption), e.g. for sample grids and evaluation."""
    return [caption(c, index, heldout) for c in range(len(FASHION_CLASSES))]


def pixel_values(images: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 ``N x 28 x 28`` -> float32 ``N x 1 x size x size`` in [-1, 1], zero-padded (black, the images'
    background) symmetrically to ``size`` so that a VAE with downsampling by 4 or 8 divides it evenly."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"expected uint8 images of shape N x 28 x 28, got {images.shape}")
    if size < 28:
        raise ValueError(f"size must be >= 28 (images are padded, not cropped), got {size}")
    lo = (size - 28) // 2
    out = np.full((len(images), 1, size, size), -1.0, dtype=np.float32)
    out[:, 0, lo : lo + 28, lo : lo + 28] = images.astype(np.float32) / 127.5 - 1.0
    return out
