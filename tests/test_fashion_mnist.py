"""Fashion-MNIST loader (on a tiny idx folder written here, and on Debian's files when installed) and captions."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_fashion import write_idx

from distill import fashion_mnist as fm

REAL = (fm.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_debian = pytest.mark.skipif(
    not REAL, reason=f"Debian's dataset-fashion-mnist is not installed ({fm.FASHION_MNIST_DIR} missing)"
)


@pytest.fixture
def tiny_root(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 7, 7, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 2051)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 2049)
    return tmp_path, images, labels


def test_loads_tiny_folder_with_features(tiny_root, tmp_path_factory):
    root, images, labels = tiny_root
    ds = fm.load_fashion_mnist("test", root=root, cache_dir=tmp_path_factory.mktemp("cache"))
    assert len(ds) == 7
    assert ds.features["label"].names == list(fm.FASHION_CLASSES)
    assert ds["label"] == labels.tolist()
    img = ds[3]["image"]
    assert img.mode == "L" and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img), images[3])


def test_changed_file_is_reread(tiny_root, tmp_path_factory):
    root, images, labels = tiny_root
    cache = tmp_path_factory.mktemp("cache")
    assert fm.load_fashion_mnist("test", root=root, cache_dir=cache)["label"][0] == 0
    labels = labels.copy()
    labels[0] = 4
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels, 2049)
    assert fm.load_fashion_mnist("test", root=root, cache_dir=cache)["label"][0] == 4


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fm.load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("validation", root=tmp_path)


def test_bad_magic_is_refused(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((2, 28, 28)), 2049)
    with pytest.raises(ValueError, match="magic"):
        fm.read_idx(tmp_path / "x.gz", 3)


def test_pixel_values_pad_and_scale():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[1, 0, 0] = 255
    px = fm.pixel_values(images, 32)
    assert px.shape == (2, 1, 32, 32) and px.dtype == np.float32
    assert px[1, 0, 2, 2] == 1.0 and px[1, 0, 0, 0] == -1.0 and px[0].max() == -1.0
    with pytest.raises(ValueError, match="28"):
        fm.pixel_values(images, 16)


@needs_debian
def test_debian_files():
    images, labels = fm.load_fashion_mnist_arrays("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    ds = fm.load_fashion_mnist("test")
    assert len(ds) == 10000
    np.testing.assert_array_equal(np.asarray(ds[123]["image"]), images[123])
    assert ds[123]["label"] == labels[123]


def test_captions_heldout_never_in_training():
    train = {c for k in range(10) for c in fm.all_captions(k)}
    held = {c for k in range(10) for c in fm.all_captions(k, heldout=True)}
    assert len(fm.caption_templates("train")) >= 4 and len(fm.caption_templates("heldout")) >= 3
    assert not train & held
    # no class shares a caption with another (captions identify their class)
    per_class = [set(fm.all_captions(k)) | set(fm.all_captions(k, True)) for k in range(10)]
    assert all(not per_class[a] & per_class[b] for a in range(10) for b in range(a + 1, 10))


def test_caption_draws():
    assert fm.caption(9, 0) == "a photo of an ankle boot"
    assert fm.caption(7, 1) == "a photo of a trainer"
    n = len(fm.all_captions(7))
    assert fm.caption(7, n + 1) == fm.caption(7, 1)
    rng = np.random.default_rng(0)
    drawn = {fm.caption(7, rng) for _ in range(200)}
    assert drawn == set(fm.all_captions(7))
    assert fm.caption(0, 0, heldout=True) in fm.all_captions(0, heldout=True)
    assert len(fm.class_prompts()) == 10
    with pytest.raises(ValueError, match="label"):
        fm.caption(10, 0)


def test_pixel_dataset_is_what_the_teachers_saw_with_captions(tiny_root, monkeypatch):
    """``load_image_dataset("fashion-mnist")`` (SiDA's and LoRA's real data): padded pixels, labels, and a
    training caption of each row's class; ``heldout`` is the test split; wrong shapes are refused by name."""
    from distill.data import load_image_dataset

    root, images, labels = tiny_root
    monkeypatch.setattr(fm, "FASHION_MNIST_DIR", root)
    ds = load_image_dataset("fashion-mnist", split="heldout", resolution=32, channels=1)
    np.testing.assert_allclose(
        np.asarray(ds.with_format("numpy")["pixel_values"]), fm.pixel_values(images, 32)
    )
    assert list(ds["label"]) == labels.tolist()
    texts = list(ds["text"])
    assert [t in fm.all_captions(c) for t, c in zip(texts, labels)] == [True] * 7
    assert texts[3] == fm.all_captions(7)[3] and texts[4] == fm.all_captions(7)[4]  # row i: the i-th caption
    assert len(load_image_dataset("fashion-mnist", split="test")[0]["pixel_values"]) == 1  # default size 32
    with pytest.raises(ValueError, match="fashion-mnist images have 1 channel, channels=3"):
        load_image_dataset("fashion-mnist", split="test", channels=3)
    with pytest.raises(ValueError, match="resolution=16 < 28"):
        load_image_dataset("fashion-mnist", split="test", resolution=16)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_image_dataset("fashion-mnist", split="train")  # the tiny folder has no training split
