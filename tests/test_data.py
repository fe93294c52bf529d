"""Data loading: the fixed digits split, image folders, and the torch view/collate used by recipes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from distill.data import (
    digits_split_indices,
    load_digits_dataset,
    load_digits_tensors,
    load_image_dataset,
    load_image_folder_dataset,
    to_torch,
    torch_collate,
)


def test_digits_split_sizes() -> None:
    assert len(load_digits_dataset("train")) == 1397
    assert len(load_digits_dataset("heldout")) == 400
    assert len(load_digits_dataset("all")) == 1797


def test_heldout_is_stratified_and_train_keeps_the_rest() -> None:
    held = np.asarray(load_digits_dataset("heldout")["label"][:])
    train = np.asarray(load_digits_dataset("train")["label"][:])
    assert np.bincount(held, minlength=10).tolist() == [40] * 10
    everything = np.bincount(load_digits().target, minlength=10)
    assert (np.bincount(train, minlength=10) == everything - 40).all()


def test_splits_are_disjoint_cover_everything_and_hold_the_right_rows() -> None:
    idx = digits_split_indices()
    train, held = set(idx["train"].tolist()), set(idx["heldout"].tolist())
    assert not train & held
    assert train | held == set(range(1797))
    raw = load_digits()
    for split in ("train", "heldout"):
        images, labels = load_digits_tensors(split)
        expected = raw.images[idx[split]] / 8.0 - 1.0
        assert np.allclose(images[:, 0].numpy(), expected)
        assert (labels.numpy() == raw.target[idx[split]]).all()


def test_split_is_fixed() -> None:
    """The shipped classifier and every reported number depend on this exact split: it must never drift."""
    idx = digits_split_indices()
    assert idx["heldout"][:8].tolist() == [1, 3, 4, 5, 6, 7, 11, 13]
    assert int(idx["heldout"].sum()) == 371179
    assert (digits_split_indices()["heldout"] == idx["heldout"]).all()


def test_digits_values_shapes_and_dtypes() -> None:
    ds = to_torch(load_digits_dataset("all"))
    pixels, labels = ds["pixel_values"][:], ds["label"][:]
    assert pixels.shape == (1797, 1, 8, 8) and pixels.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert float(pixels.min()) == -1.0 and float(pixels.max()) == 1.0
    row = load_digits_dataset("train")[0]
    assert np.asarray(row["pixel_values"]).shape == (1, 8, 8) and isinstance(row["label"], int)


def test_invalid_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="'train', 'heldout' or 'all'"):
        load_digits_dataset("test")  # type: ignore[arg-type]


def test_digits_at_another_resolution_and_as_rgb() -> None:
    ds = load_image_dataset("digits", split="heldout", resolution=16, channels=3)
    x = torch.as_tensor(ds[0]["pixel_values"])
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0], x[2])


def test_collate_and_torch_view_give_the_same_batches() -> None:
    ds = load_digits_dataset("heldout")
    plain = next(iter(DataLoader(ds, batch_size=16, collate_fn=torch_collate)))
    viewed = next(iter(DataLoader(to_torch(ds), batch_size=16)))
    assert plain["pixel_values"].shape == (16, 1, 8, 8) and plain["pixel_values"].dtype == torch.float32
    assert plain["label"].shape == (16,) and plain["label"].dtype == torch.long
    assert torch.equal(plain["pixel_values"], viewed["pixel_values"])
    assert torch.equal(plain["label"], viewed["label"])
    no_label = torch_collate([{"pixel_values": [[[0.0]]]}])
    assert set(no_label) == {"pixel_values"}


def _write_folder(root: Path) -> None:
    """Two classes of images of different sizes and modes: white in ``ones``, black in ``zeros``."""
    (root / "ones").mkdir(parents=True)
    (root / "zeros").mkdir()
    Image.new("L", (12, 10), 255).save(root / "ones" / "a.png")
    Image.new("RGB", (10, 10), (255, 255, 255)).save(root / "ones" / "b.png")
    Image.new("L", (16, 16), 0).save(root / "zeros" / "c.png")
    Image.new("RGBA", (9, 14), (0, 0, 0, 255)).save(root / "zeros" / "d.png")


def test_image_folder_loader(tmp_path: Path) -> None:
    _write_folder(tmp_path / "imgs")
    ds = load_image_folder_dataset(tmp_path / "imgs", resolution=8, channels=1, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 4 and set(ds.column_names) == {"pixel_values", "label"}
    batch = torch_collate([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (4, 1, 8, 8)
    names = ds.features["label"].names
    for x, y in zip(batch["pixel_values"], batch["label"]):
        expected = 1.0 if names[int(y)] == "ones" else -1.0
        assert torch.allclose(x, torch.full_like(x, expected))
    assert sorted(batch["label"].tolist()) == [0, 0, 1, 1]


def test_image_dataset_dispatches_to_folders_in_rgb(tmp_path: Path) -> None:
    _write_folder(tmp_path / "imgs")
    ds = load_image_dataset(str(tmp_path / "imgs"), resolution=4, channels=3, cache_dir=str(tmp_path / "c"))
    x = to_torch(ds)["pixel_values"][:]
    assert x.shape == (4, 3, 4, 4) and x.min() >= -1 and x.max() <= 1


def test_missing_or_empty_folder_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_image_folder_dataset(missing, resolution=8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty.*contains no images"):
        load_image_folder_dataset(tmp_path / "empty", resolution=8)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_image_dataset(str(missing))


def test_image_folder_with_train_and_test_splits(tmp_path: Path) -> None:
    _write_folder(tmp_path / "imgs" / "train")
    _write_folder(tmp_path / "imgs" / "test")
    Image.new("L", (8, 8), 0).save(tmp_path / "imgs" / "test" / "zeros" / "e.png")
    cache = str(tmp_path / "c")
    assert len(load_image_dataset(str(tmp_path / "imgs"), "train", 8, 1, cache_dir=cache)) == 4
    assert len(load_image_dataset(str(tmp_path / "imgs"), "heldout", 8, 1, cache_dir=cache)) == 5
    assert len(load_image_dataset(str(tmp_path / "imgs"), "all", 8, 1, cache_dir=cache)) == 9
    _write_folder(tmp_path / "flat")
    with pytest.raises(ValueError, match="no split matches 'heldout'"):
        load_image_folder_dataset(tmp_path / "flat", 8, split="heldout", cache_dir=cache)


def _two_sizes(root: Path) -> None:
    """Three 12x12 grey images and two 20x16 RGB ones."""
    root.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (12, 12), 40 * i).save(root / f"small_{i}.png")
    for i in range(2):
        Image.new("RGB", (20, 16), (200, 10 * i, 0)).save(root / f"big_{i}.png")


def test_mixed_sizes_or_modes_are_refused_with_examples(tmp_path: Path) -> None:
    _two_sizes(tmp_path / "mixed")
    cache = str(tmp_path / "c")
    with pytest.raises(ValueError) as err:
        load_image_folder_dataset(tmp_path / "mixed", cache_dir=cache)
    message = str(err.value)
    assert "different sizes and channel counts" in message
    assert "12x12 L: 3 images (e.g. mixed/small_0.png" in message
    assert "20x16 RGB: 2 images (e.g. mixed/big_0.png, mixed/big_1.png)" in message
    assert "--resolution 12 --channels 3" in message  # the smallest side, colour kept
    with pytest.raises(ValueError, match=r"different channel counts \(grey and colour\): "):
        load_image_folder_dataset(tmp_path / "mixed", resolution=8, cache_dir=cache)  # size given, mode not
    with pytest.raises(ValueError, match="different sizes: "):
        load_image_folder_dataset(tmp_path / "mixed", channels=1, cache_dir=cache)  # mode given, size not


def test_resizing_on_purpose_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _two_sizes(tmp_path / "mixed")
    ds = load_image_folder_dataset(
        tmp_path / "mixed", resolution=12, channels=1, cache_dir=str(tmp_path / "c")
    )
    x = to_torch(ds)["pixel_values"][:]
    assert x.shape == (5, 1, 12, 12)
    err = capsys.readouterr().err
    assert "resized 2 of 5 images to 12x12" in err and "converted 2 of 5 images to grey" in err
    # grey 0/40/80 unchanged; RGB (200, 0, 0) and (200, 10, 0) to grey (ITU-R 601-2 luma) 60 and 66
    values = sorted(round(float(v[0, 0, 0]) * 127.5 + 127.5) for v in x)
    assert values == [0, 40, 60, 66, 80]
    assert all(float(v.std()) < 1e-6 for v in x)  # flat images stay flat through resize and crop


def test_uniform_folder_needs_no_resolution_and_reports_nothing(tmp_path: Path, capsys) -> None:
    root = tmp_path / "same"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (i, i, i)).save(root / f"{i}.png")
    ds = load_image_folder_dataset(root, cache_dir=str(tmp_path / "c"))
    assert to_torch(ds)["pixel_values"][:].shape == (3, 3, 10, 10)
    assert "resized" not in capsys.readouterr().err
