"""Image data as ``datasets.Dataset`` with a ``pixel_values`` column (C x H x W float32 in [-1, 1]) and, when
the source has classes, an integer ``label`` column.

Four sources, picked by :func:`load_image_dataset`:

- ``"digits"``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside scikit-learn, so the
  default recipes and tests need no network). Pixels in [0, 16] are mapped to [-1, 1] by ``x / 8 - 1``.
- ``"fashion-mnist"``: Debian's Fashion-MNIST (:mod:`distill.fashion_mnist`), padded to 32x32, with a caption per
  image in ``text`` (the shipped text-to-image teachers' data);
- a local folder of images, read by ``datasets``' ``imagefolder`` builder (class sub-folders become labels;
  a metadata ``text`` column, the captions, is kept);
- anything else is a Hugging Face Hub dataset name (needs network the first time).

The digits split is fixed so that every teacher, student and metric in the toolkit sees the same held-out
set: for each class ``c`` the indices of that class (ascending) are shuffled by
``numpy.random.default_rng([0, c])`` and the first :data:`HELDOUT_PER_CLASS` (40) go to ``heldout``; the
other 1,397 images are ``train``. Both splits keep scikit-learn's original order. The held-out images are
what the offline metrics compare against and what the evaluation classifier is scored on, so no teacher or
classifier ever trains on them.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DigitsSplit = Literal["train", "heldout", "all"]

DIGITS_NUM_CLASSES = 10
DIGITS_SHAPE = (1, 8, 8)
HELDOUT_PER_CLASS = 40
SPLIT_SEED = 0
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_ONE_CHANNEL_MODES = {"1", "L", "LA", "I", "I;16", "F"}


# --- digits -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as read-only arrays (read once per process: it parses a csv.gz)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0).reshape(-1, *DIGITS_SHAPE)
    labels = bunch.target.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def digits_split_indices() -> dict[str, np.ndarray]:
    """Row indices into ``sklearn.datasets.load_digits()`` per split (ascending; see the module docstring)."""
    _, labels = _digits_raw()
    heldout = []
    for c in range(DIGITS_NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([SPLIT_SEED, c])
        heldout.append(rng.permutation(members)[:HELDOUT_PER_CLASS])
    held = np.sort(np.concatenate(heldout))
    train = np.setdiff1d(np.arange(len(labels)), held)
    return {"train": train, "heldout": held, "all": np.arange(len(labels))}


def _check_split(split: str) -> None:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def _resize_tensor(images: torch.Tensor, resolution: int | None, channels: int | None) -> torch.Tensor:
    """Digits at another size or as RGB, for teachers configured that way (antialiased bilinear)."""
    if resolution is not None and resolution != images.shape[-1]:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
    if channels is not None and channels != images.shape[1]:
        if channels != 3 or images.shape[1] != 1:
            raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
        images = images.repeat(1, 3, 1, 1)
    return images.clamp(-1.0, 1.0)


def load_digits_tensors(
    split: DigitsSplit = "train", resolution: int | None = None, channels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits split as ``(images [N, C, H, W] float32 in [-1, 1], labels [N] int64)``: the fast path for
    metrics and the evaluation classifier, which need whole splits rather than rows."""
    _check_split(split)
    images, labels = _digits_raw()
    idx = digits_split_indices()[split]
    x = torch.from_numpy(images[idx].copy())
    return _resize_tensor(x, resolution, channels), torch.from_numpy(labels[idx].copy())


def load_digits_dataset(
    split: DigitsSplit = "train", resolution: int | None = None, channels: int | None = None
) -> datasets.Dataset:
    """The digits split as a ``datasets.Dataset`` (columns ``pixel_values`` 1x8x8 and ``label``)."""
    images, labels = load_digits_tensors(split, resolution, channels)
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=tuple(images.shape[1:]), dtype="float32"),
            "label": datasets.ClassLabel(names=[str(i) for i in range(DIGITS_NUM_CLASSES)]),
        }
    )
    return datasets.Dataset.from_dict(
        {"pixel_values": images.numpy(), "label": labels.numpy()}, features=features, split=split
    )


# --- image folders and hub datasets -------------------------------------------------------------------------
def pil_to_pixel_values(image: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """PIL image -> C x R x R float32 in [-1, 1]: shorter side resized to R (bicubic), then centre-cropped."""
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def _find_image_column(dataset: datasets.Dataset, source: str) -> str:
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"{source}: no image column among {list(dataset.features)}")


def _find_label_column(dataset: datasets.Dataset) -> str | None:
    if "label" in dataset.column_names:
        return "label"
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    return None


def _channels_of_mode(mode: str) -> int:
    return 1 if mode in _ONE_CHANNEL_MODES else 3


def _image_name(value: dict[str, Any], row: int) -> str:
    path = value.get("path")
    return "/".join(Path(path).parts[-2:]) if path else f"row {row}"


def survey_images(dataset: datasets.Dataset, image_column: str) -> dict[tuple[int, int, str], list]:
    """``{(width, height, mode): [count, example names...]}`` over all images, read from file headers only
    (nothing is decoded), so a folder of mixed sizes or colour modes is found before any resizing."""
    raw = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    groups: dict[tuple[int, int, str], list] = {}
    row = 0
    for batch in raw.iter(batch_size=1000):
        for value in batch[image_column]:
            source = value.get("path") if value.get("bytes") is None else io.BytesIO(value["bytes"])
            with Image.open(source) as image:
                key = (image.size[0], image.size[1], image.mode)
            entry = groups.setdefault(key, [0])
            entry[0] += 1
            if len(entry) < 4:
                entry.append(_image_name(value, row))
            row += 1
    return groups


def _describe_groups(groups: dict[tuple[int, int, str], list], limit: int = 6) -> str:
    ordered = sorted(groups.items(), key=lambda item: -item[1][0])
    parts = [
        f"{w}x{h} {mode}: {entry[0]} image{'s' if entry[0] != 1 else ''} (e.g. {', '.join(entry[1:])})"
        for (w, h, mode), entry in ordered[:limit]
    ]
    if len(ordered) > limit:
        parts.append(f"and {len(ordered) - limit} more size/mode combinations")
    return "; ".join(parts)


def _checked_shape(
    groups: dict[tuple[int, int, str], list], resolution: int | None, channels: int | None, source: str
) -> tuple[int, int]:
    """The (resolution, channels) to convert to: as given, else the images' own when they all agree.

    Mixed sizes (without ``resolution``) or mixed channel counts (without ``channels``) are refused rather
    than silently resized to one image's shape.
    """
    sizes = {(w, h) for w, h, _ in groups}
    counts = {_channels_of_mode(mode) for _, _, mode in groups}
    mixed = []
    if resolution is None and len(sizes) > 1:
        mixed.append("sizes")
    if channels is None and len(counts) > 1:
        mixed.append("channel counts (grey and colour)")
    if mixed:
        size, colour = min(min(wh) for wh in sizes), max(counts)
        raise ValueError(
            f"{source} holds images of different {' and '.join(mixed)}: {_describe_groups(groups)}. "
            "Pass a resolution (and channels: 1 grey, 3 RGB) to resize them on purpose, e.g. "
            f"--resolution {size} --channels {colour} "
            f"(load_image_dataset(..., resolution={size}, channels={colour}))"
        )
    resolution = resolution or min(next(iter(sizes)))
    channels = channels or next(iter(counts))
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return resolution, channels


def _note_conversions(
    groups: dict[tuple[int, int, str], list], resolution: int, channels: int, source: str
) -> None:
    total = sum(entry[0] for entry in groups.values())
    resized = sum(entry[0] for (w, h, _), entry in groups.items() if (w, h) != (resolution, resolution))
    converted = sum(entry[0] for (_, _, mode), entry in groups.items() if _channels_of_mode(mode) != channels)
    if resized:
        print(
            f"{source}: resized {resized} of {total} images to {resolution}x{resolution} "
            f"(shorter side to {resolution}, then centre crop)",
            file=sys.stderr,
            flush=True,
        )
    if converted:
        target = "grey" if channels == 1 else "RGB"
        print(f"{source}: converted {converted} of {total} images to {target}", file=sys.stderr, flush=True)


def images_to_pixel_values(
    dataset: datasets.Dataset, resolution: int | None, channels: int | None, source: str
) -> datasets.Dataset:
    """Replace the image column by ``pixel_values`` (and keep a class column as ``label``), so every source
    looks the same to recipes.

    Without ``resolution`` / ``channels`` all images must share a size / channel count (a square size is
    kept, a non-square one is centre-cropped to its shorter side); otherwise the error lists examples of each
    size and mode found. With them, images are resized / converted and a line says how many were.
    """
    if len(dataset) == 0:
        raise ValueError(f"{source}: the dataset has no rows")
    image_column = _find_image_column(dataset, source)
    label_column = _find_label_column(dataset)
    groups = survey_images(dataset, image_column)
    resolution, channels = _checked_shape(groups, resolution, channels, source)
    _note_conversions(groups, resolution, channels, source)
    features: dict[str, Any] = {
        "pixel_values": datasets.Array3D(shape=(channels, resolution, resolution), dtype="float32")
    }
    if label_column is not None:
        features["label"] = dataset.features[label_column]
    keep_text = "text" in dataset.column_names  # captions (imagefolder's metadata "text"), for text teachers
    if keep_text:
        features["text"] = datasets.Value("string")

    def convert(batch: dict[str, list]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pixel_values": np.stack(
                [pil_to_pixel_values(im, resolution, channels) for im in batch[image_column]]
            )
        }
        if label_column is not None:
            out["label"] = batch[label_column]
        if keep_text:
            out["text"] = batch["text"]
        return out

    return dataset.map(
        convert,
        batched=True,
        batch_size=256,
        remove_columns=dataset.column_names,
        features=datasets.Features(features),
        desc=f"images -> pixel_values ({channels}x{resolution}x{resolution})",
    )


_HELDOUT_NAMES = ("test", "validation", "valid", "heldout")


def _pick_split(splits: datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    """'train' / 'heldout' / 'all' (or a split's own name) out of what the source provides."""
    if split in splits:
        return splits[split]
    if split == "all":
        return datasets.concatenate_datasets(list(splits.values()))
    if split == "heldout":
        for name in _HELDOUT_NAMES:
            if name in splits:
                return splits[name]
    raise ValueError(
        f"{source} has splits {list(splits)}; no split matches {split!r} "
        "(for a held-out split put images under test/ and train/ sub-folders)"
    )


def load_image_folder_dataset(
    path: str | os.PathLike,
    resolution: int | None = None,
    channels: int | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """A local image folder (offline, via ``imagefolder``); class sub-folders become the ``label`` column.

    Images are resized (shorter side to ``resolution``) and centre-cropped; ``channels``: 1 grey, 3 RGB.
    A folder with ``train/`` and ``test/`` sub-folders provides ``split='heldout'`` too.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist (or is not a directory)")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file()):
        raise ValueError(
            f"image folder {str(folder)!r} contains no images "
            f"(looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    splits = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir)
    dataset = _pick_split(splits, split, f"image folder {str(folder)!r}")
    return images_to_pixel_values(dataset, resolution, channels, f"image folder {str(folder)!r}")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(spec)


def load_image_dataset(
    spec: str,
    split: str = "train",
    resolution: int | None = None,
    channels: int | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Resolve a recipe's ``dataset`` option: ``"digits"``, ``"fashion-mnist"`` (Debian's package, padded to 32
    with captions), an existing local folder, or a hub dataset name.

    ``split`` is ``"train"``, ``"heldout"`` (a folder's or hub dataset's ``test``/``validation`` split) or
    ``"all"``; for hub datasets any other split string is passed to ``datasets.load_dataset`` unchanged.
    """
    if spec == "digits":
        _check_split(split)
        return load_digits_dataset(split, resolution, channels)  # type: ignore[arg-type]
    if spec == "fashion-mnist":
        return _fashion_mnist(split, resolution, channels)
    if Path(spec).expanduser().is_dir():
        return load_image_folder_dataset(spec, resolution, channels, split=split, cache_dir=cache_dir)
    if _looks_like_path(spec):
        raise FileNotFoundError(f"dataset {spec!r} looks like a path but no such directory exists")
    try:
        splits = datasets.load_dataset(spec, cache_dir=cache_dir)
    except Exception as err:  # network, auth, unknown name: all end the same way for the user
        raise RuntimeError(
            f"could not load dataset {spec!r}: it is neither 'digits' nor an existing local folder, so it "
            f"was treated as a Hugging Face Hub dataset name, and loading it failed "
            f"({type(err).__name__}: {err}). "
            "Offline, use 'digits' or a local image folder (or a hub dataset already in the datasets cache)."
        ) from err
    if isinstance(splits, datasets.DatasetDict):
        try:
            dataset = _pick_split(splits, split, f"hub dataset {spec!r}")
        except ValueError:
            dataset = datasets.load_dataset(spec, split=split, cache_dir=cache_dir)
    else:
        dataset = splits
    return images_to_pixel_values(dataset, resolution, channels, f"hub dataset {spec!r}")


def _fashion_mnist(split: str, resolution: int | None, channels: int | None) -> datasets.Dataset:
    """``"fashion-mnist"``: Debian's Fashion-MNIST, padded to ``resolution`` (default 32) as the shipped
    text-to-image teachers saw it, with ``label`` and a training caption in ``text``; ``heldout`` is the test set."""
    from distill.fashion_mnist import load_fashion_mnist_pixels

    if channels not in (None, 1):
        raise ValueError(f"fashion-mnist images have 1 channel, channels={channels} was asked for")
    if resolution is not None and resolution < 28:
        raise ValueError(
            f"fashion-mnist images are 28x28 and padded, not cropped: resolution={resolution} < 28"
        )
    splits = {"train": ["train"], "heldout": ["test"], "test": ["test"], "all": ["train", "test"]}
    if split not in splits:
        raise ValueError(f"fashion-mnist split must be one of {sorted(splits)}, got {split!r}")
    parts = [load_fashion_mnist_pixels(s, resolution or 32) for s in splits[split]]  # type: ignore[arg-type]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --- torch --------------------------------------------------------------------------------------------------
def to_torch(dataset: datasets.Dataset) -> datasets.Dataset:
    """A view whose rows are tensors (``pixel_values`` float32 CxHxW, ``label`` int64), for DataLoaders."""
    columns = [c for c in ("pixel_values", "label") if c in dataset.column_names]
    return dataset.with_format("torch", columns=columns)


def torch_collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """DataLoader ``collate_fn`` for rows in python or torch format: ``{"pixel_values": [B, C, H, W] float32,
    "label": [B] int64}`` (``label`` only when the rows have one)."""
    if not rows:
        raise ValueError("torch_collate got an empty batch")
    pixels = [torch.as_tensor(r["pixel_values"], dtype=torch.float32) for r in rows]
    batch = {"pixel_values": torch.stack(pixels)}
    if all("label" in r and r["label"] is not None for r in rows):
        batch["label"] = torch.as_tensor([int(r["label"]) for r in rows], dtype=torch.long)
    return batch


def collate_with_captions(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """:func:`torch_collate` plus ``caption_index`` [B] int64: the row of each image's caption among a text
    teacher's encoded prompts (the SiD recipe's real data for text teachers)."""
    batch = torch_collate(rows)
    batch["caption_index"] = torch.as_tensor([int(r["caption_index"]) for r in rows], dtype=torch.long)
    return batch


def new_digits(
    split: str = "train", classes: Sequence[int] = (), transform: str = "rot90"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images ``[N, 1, 8, 8]`` in [-1, 1] and labels, from ``split`` ("train" or "heldout"), optionally
    only ``classes``, with ``transform`` "rot90" (new to the default teacher) or "none": the "new images" the
    LoRA recipe adapts the default digits teacher to (it only saw upright digits)."""
    images, labels = load_digits_tensors(split)  # type: ignore[arg-type]
    if classes:
        keep = torch.isin(labels, torch.as_tensor(list(classes)))
        images, labels = images[keep], labels[keep]
    if transform == "rot90":
        images = torch.rot90(images, 1, dims=(-2, -1)).contiguous()
    elif transform != "none":
        raise ValueError(f"digits transform must be 'rot90' or 'none', got {transform!r}")
    if len(images) == 0:
        raise ValueError(f"No digits of classes {list(classes)} in split {split!r}")
    return images, labels
