"""Offline metrics: closed-form checks of FD and k-NN precision/recall, the shipped digits classifier, the
evaluator's input checks and floor, and the no-download guarantee of the standard-FID path."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distill.data import load_digits_tensors
from distill.evaluation.classifier import DigitsClassifier, load_digits_classifier, save_digits_classifier
from distill.evaluation.metrics import (
    DigitsEvaluator,
    frechet_distance,
    frechet_distance_from_statistics,
    frechet_distance_terms,
    inception_fid,
    label_histogram,
    mode_coverage,
    precision_recall,
)


@pytest.fixture(scope="module")
def evaluator() -> DigitsEvaluator:
    return DigitsEvaluator()


# --- Frechet distance ---------------------------------------------------------------------------------------
def test_fd_of_identical_sets_is_zero() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(feats), feats) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_diagonal_gaussians_matches_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.5, 2.0, size=6), rng.uniform(0.5, 2.0, size=6)
    closed = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    exact = frechet_distance_from_statistics(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert exact == pytest.approx(closed, rel=1e-9)
    a = mu1 + s1 * rng.standard_normal((100_000, 6))
    b = mu2 + s2 * rng.standard_normal((100_000, 6))
    assert frechet_distance(a, b) == pytest.approx(closed, rel=0.03)


def test_fd_terms_split_diagonal_gaussians_into_their_closed_form_parts() -> None:
    """Mean term ||mu1 - mu2||^2 and covariance term sum (s1 - s2)^2 for diagonal Gaussians; they add to fd."""
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2.0, size=5), rng.uniform(0.5, 2.0, size=5)
    terms = frechet_distance_terms(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert terms["fd_mean"] == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-12)
    assert terms["fd_covariance"] == pytest.approx(float(((s1 - s2) ** 2).sum()), rel=1e-9)
    assert terms["fd"] == pytest.approx(
        frechet_distance_from_statistics(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    )
    shifted = frechet_distance_terms(mu1, np.diag(s1**2), mu1 + 3.0, np.diag(s1**2))  # same spread, moved
    assert shifted["fd_mean"] == pytest.approx(45.0) and shifted["fd_covariance"] == pytest.approx(
        0.0, abs=1e-9
    )


def _fd_by_eigh(x: np.ndarray, y: np.ndarray) -> float:
    """FD with tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)): symmetric eigensolvers
    only, an independent route to the number ``frechet_distance`` gets from scipy's sqrtm."""
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def test_fd_is_symmetric_and_survives_singular_covariances() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 8)), rng.normal(1.0, 2.0, size=(200, 8))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(_fd_by_eigh(a, b), rel=1e-9)
    few_a, few_b = rng.normal(size=(5, 20)), rng.normal(size=(6, 20))  # rank-deficient covariances
    assert frechet_distance(few_a, few_b) == pytest.approx(_fd_by_eigh(few_a, few_b), rel=1e-6)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(a, few_a)


def test_fd_of_a_shifted_copy_is_the_squared_shift() -> None:
    """Same covariance, means apart by c: FD = ||c||^2 exactly (the trace terms cancel)."""
    feats = np.random.default_rng(3).normal(size=(400, 10))
    shift = np.linspace(-0.5, 0.5, 10)
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-7)


# --- precision / recall -------------------------------------------------------------------------------------
def test_precision_recall_identical_and_far_apart_sets() -> None:
    feats = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert precision_recall(feats, feats.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(feats, feats + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_hand_built_case() -> None:
    # Real points 0..4 on a line, k=1: every real ball has radius 1.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    # Fake points -3, 0.5, 4.8, 10: nearest-neighbour radii 3.5, 3.5, 4.3, 5.2.
    fake = np.array([[-3.0], [0.5], [4.8], [10.0]])
    # Precision: 0.5 (ball of 0 or 1) and 4.8 (ball of 4) are inside, -3 and 10 are not -> 2/4.
    # Recall: the ball of 0.5 (radius 3.5) covers 0, 1, 2, 3; 4 is 0.8 from 4.8 (radius 4.3) -> 5/5.
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # Fake points 0.1, 0.3, 0.5 (radii 0.2 with k=1) cover only real 0 (0.1 away) -> recall 1/5; all inside.
    assert precision_recall(real, np.array([[0.1], [0.3], [0.5]]), k=1) == (1.0, 0.2)


def test_precision_recall_needs_more_points_than_k() -> None:
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 2)), np.ones((10, 2)), k=3)


# --- labels -------------------------------------------------------------------------------------------------
class PixelArgmax(nn.Module):
    """Stub classifier: class = which of the first ten pixels is brightest."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] + self.dummy


def test_label_histogram_counts_every_image() -> None:
    classes = torch.tensor([0, 3, 3, 9, 9, 9] * 50)
    images = torch.full((len(classes), 1, 8, 8), -1.0)
    images.flatten(1)[torch.arange(len(classes)), classes] = 1.0
    counts = label_histogram(PixelArgmax(), images, batch_size=64)
    assert counts.tolist() == [50, 0, 0, 100, 0, 0, 0, 0, 0, 150]
    assert int(counts.sum()) == len(images)


def test_mode_coverage() -> None:
    uniform = mode_coverage(torch.full((10,), 7))
    assert uniform["classes_covered"] == 10 and uniform["label_entropy"] == pytest.approx(1.0)
    collapsed = mode_coverage(torch.tensor([0, 0, 500, 0, 0, 0, 0, 0, 0, 0]))
    assert collapsed["classes_covered"] == 1 and collapsed["label_entropy"] == pytest.approx(0.0)
    two = mode_coverage([96, 4, 0, 0, 0, 0, 0, 0, 0, 0], min_share=0.05)
    assert two["classes_covered"] == 1


# --- the shipped classifier and the evaluator ---------------------------------------------------------------
def test_shipped_classifier_accuracy_on_heldout() -> None:
    model = load_digits_classifier()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, y = load_digits_tensors("heldout")
    accuracy = float((model.predict(x) == y).float().mean())
    print(f"\nshipped digits classifier: held-out accuracy {accuracy:.4f}")
    assert accuracy >= 0.97
    assert model.features(x[:5]).shape == (5, 64)


def test_classifier_roundtrip_and_missing_file(tmp_path: Path) -> None:
    model = DigitsClassifier().eval()
    save_digits_classifier(model, tmp_path / "c.safetensors")
    loaded = load_digits_classifier(tmp_path / "c.safetensors")
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert torch.equal(model(x), loaded(x))
    with pytest.raises(FileNotFoundError, match="recipes/train_eval_classifier.py"):
        load_digits_classifier(tmp_path / "missing.safetensors")


def test_evaluator_rejects_wrong_shapes_and_dtypes(evaluator: DigitsEvaluator) -> None:
    with pytest.raises(ValueError, match=r"got shape \[7, 3, 8, 8\]") as err:
        evaluator.evaluate(torch.zeros(7, 3, 8, 8))
    assert "[N, 1, 8, 8]" in str(err.value)
    with pytest.raises(ValueError, match=r"got shape \[1, 8, 8\]"):
        evaluator.evaluate(torch.zeros(1, 8, 8))
    with pytest.raises(TypeError, match="dtype torch.uint8"):
        evaluator.evaluate(torch.zeros(7, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        evaluator.evaluate(torch.full((7, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="at least 2 images"):
        evaluator.evaluate(torch.zeros(1, 1, 8, 8))
    three = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    tiny = evaluator.evaluate(three)
    assert tiny["fd"] == pytest.approx(
        frechet_distance(evaluator.real_features, evaluator.features(three)[0])
    )
    assert math.isnan(tiny["precision"]) and tiny["num_samples"] == 3


def test_evaluator_on_the_reference_itself_and_clamping(evaluator: DigitsEvaluator) -> None:
    held, _ = load_digits_tensors("heldout")
    metrics = evaluator.evaluate(held)
    assert set(metrics) == {"fd", "precision", "recall", "classes_covered", "label_entropy", "num_samples"}
    assert metrics["fd"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["classes_covered"] == 10 and metrics["num_samples"] == 400
    assert evaluator.evaluate(held * 3.0) == evaluator.evaluate((held * 3.0).clamp(-1.0, 1.0))


def test_real_floor_is_small_against_noise_and_collapse(evaluator: DigitsEvaluator) -> None:
    floor = evaluator.real_floor()
    noise = evaluator.evaluate(torch.randn(2000, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    train, labels = load_digits_tensors("train")
    zeros_only = evaluator.evaluate(train[labels == 0])
    print(
        f"\nFD floor (train vs heldout) {floor['fd']:.3f}  P/R {floor['precision']:.3f}/{floor['recall']:.3f}"
        f"\nFD N(0,1) noise x2000       {noise['fd']:.3f}  P/R {noise['precision']:.3f}/{noise['recall']:.3f}"
        f"\nFD class-0 only             {zeros_only['fd']:.3f}  covered {zeros_only['classes_covered']}"
    )
    assert math.isfinite(floor["fd"]) and 0.0 < floor["fd"] < noise["fd"] / 20
    assert floor["precision"] > 0.8 and floor["recall"] > 0.8 and floor["classes_covered"] == 10
    assert noise["precision"] < 0.1 and noise["recall"] < 0.2
    assert zeros_only["classes_covered"] == 1 and zeros_only["recall"] < 0.3
    assert zeros_only["fd"] > 20 * floor["fd"]


# --- standard FID -------------------------------------------------------------------------------------------
def test_inception_fid_without_torch_fidelity_explains_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes the import fail even where installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(RuntimeError, match="pip install torch-fidelity") as err:
        inception_fid(images, images)
    assert "weights-inception-2015-12-05" in str(err.value)


def test_inception_fid_never_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With the package present but no weights given or cached, it must refuse before building the network."""
    built = []
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fake.FeatureExtractorInceptionV3 = lambda *a, **k: built.append((a, k))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(RuntimeError, match="will not download") as err:
        inception_fid(images, images)
    assert "weights_path" in str(err.value) and "feature_extractor_weights_path" in str(err.value)
    with pytest.raises(RuntimeError, match="does not exist"):
        inception_fid(images, images, weights_path=tmp_path / "nope.pth")
    assert built == []


def test_inception_fid_passes_weights_and_uint8_rgb_to_torch_fidelity(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The happy path against a stand-in extractor: the weights file goes to feature_extractor_weights_path,
    images arrive as uint8 RGB as torch-fidelity requires, and identical sets give FID 0."""
    calls: dict = {}

    class FakeExtractor(nn.Module):
        def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str) -> None:
            super().__init__()
            calls.update(name=name, features=features_list, weights=feature_extractor_weights_path)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            calls["dtype"], calls["channels"] = x.dtype, x.shape[1]
            return (x.float().flatten(1)[:, :16],)

    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fake.FeatureExtractorInceptionV3 = FakeExtractor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in")
    images = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert inception_fid(images, images.clone(), weights_path=weights) == pytest.approx(0.0, abs=1e-6)
    assert calls == {
        "name": "inception-v3-compat",
        "features": ["2048"],
        "weights": str(weights),
        "dtype": torch.uint8,
        "channels": 3,
    }
