"""Offline sample-quality metrics: Frechet distance, k-NN precision/recall, label histogram / mode coverage.

On the default 8x8 digits the features come from the shipped digits classifier (:mod:`distill.evaluation.classifier`), and
generated images are compared against the 400 held-out digits that no teacher or classifier trained on.
:meth:`DigitsEvaluator.real_floor` gives the same metrics for *real* train images vs. held-out, i.e. the best
a perfect generator can expect with these sample sizes; report it next to any FD.

The classical Inception FID is available through torch-fidelity when installed, and never downloads weights.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from distill.data import DIGITS_SHAPE, load_digits_tensors
from distill.evaluation.classifier import DigitsClassifier, load_digits_classifier

ArrayLike = np.ndarray | torch.Tensor

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)


# --- Frechet distance ---------------------------------------------------------------------------------------
def _as_matrix(feats: ArrayLike, name: str) -> np.ndarray:
    array = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    array = array.astype(np.float64, copy=False)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix, got shape {tuple(array.shape)}")
    if len(array) < 2:
        raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {len(array)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains non-finite values")
    return array


def feature_statistics(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance in float64, the sufficient statistics of the Frechet distance."""
    array = _as_matrix(feats, "feats")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def _usable_sqrt(covmean: np.ndarray) -> bool:
    if not np.isfinite(covmean).all():
        return False
    return not np.iscomplexobj(covmean) or np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3)


def frechet_distance_from_statistics(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with the usual fallback for a near-singular S1 S2."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # a singular product is handled just below
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not _usable_sqrt(covmean):
        # Near-singular product (fewer samples than dimensions, dead features): regularise both covariances.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("matrix square root of the covariance product is not finite, even with eps * I")
        if not _usable_sqrt(covmean):
            imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
            warnings.warn(f"Frechet distance: dropping an imaginary part of up to {imag:.3g}", stacklevel=2)
    covmean = np.real(covmean)
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(fd, 0.0))  # tiny negative values are round-off; the distance itself is >= 0


def frechet_distance_terms(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> dict[str, float]:
    """The Frechet distance and its two parts: ``fd_mean`` = ||mu1 - mu2||^2 (where the samples sit) and
    ``fd_covariance`` = the trace term (their spread and shape, e.g. missing diversity); they sum to ``fd``."""
    fd = frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2, eps)
    diff = np.atleast_1d(mu1).astype(np.float64) - np.atleast_1d(mu2).astype(np.float64)
    mean = float(diff @ diff)
    return {"fd": fd, "fd_mean": mean, "fd_covariance": fd - mean}


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ([N, D] and [M, D]), in float64."""
    a, b = _as_matrix(feats_a, "feats_a"), _as_matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_statistics(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), eps
    )


# --- precision / recall -------------------------------------------------------------------------------------
def _as_points(feats: ArrayLike) -> torch.Tensor:
    points = feats if isinstance(feats, torch.Tensor) else torch.as_tensor(np.asarray(feats))
    return points.detach().to("cpu", torch.float64).reshape(len(points), -1)


def _rows_per_chunk(columns: int, budget: int = 1 << 23) -> int:
    """Rows of a distance block so that one block stays around 64 MB of float64."""
    return max(1, budget // max(columns, 1))


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The matmul form in float64 is >10x faster than the direct one; its error (~1e-13 between distinct
    # points, ~1e-6 for d(x, x)) is far below any k-NN radius of distinct points.
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist")


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(points) <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {len(points)}")
    radii = torch.empty(len(points), dtype=torch.float64)
    step = _rows_per_chunk(len(points))
    for start in range(0, len(points), step):
        block = _cdist(points[start : start + step], points)
        radii[start : start + step] = block.kthvalue(k + 1, dim=1).values  # +1: the point itself, at 0
    return radii


def _share_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of ``queries`` inside at least one ball (centre, radius), boundary included."""
    inside = 0
    step = _rows_per_chunk(len(centres))
    for start in range(0, len(queries), step):
        block = _cdist(queries[start : start + step], centres)
        inside += int((block <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls as manifold estimates.

    precision = share of fake points inside some real ball (fidelity); recall = share of real points inside
    some fake ball (diversity). Radii grow as sets shrink, so compare numbers only at equal sample sizes.
    """
    real, fake = _as_points(real_feats), _as_points(fake_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    precision = _share_inside(fake, real, knn_radii(real, k))
    recall = _share_inside(real, fake, knn_radii(fake, k))
    return precision, recall


# --- labels -------------------------------------------------------------------------------------------------
@torch.no_grad()
def label_histogram(
    classifier: torch.nn.Module, images: torch.Tensor, num_classes: int | None = None, batch_size: int = 1024
) -> torch.Tensor:
    """How many images the classifier puts in each class ([num_classes] int64, sums to N)."""
    device = next(classifier.parameters()).device
    predictions, width = [], num_classes
    for chunk in images.split(batch_size):
        logits = classifier(chunk.to(device, torch.float32))
        width = width or logits.shape[1]
        predictions.append(logits.argmax(dim=1).cpu())
    return torch.bincount(torch.cat(predictions), minlength=width or 0)


def mode_coverage(counts: ArrayLike, min_share: float = 0.05) -> dict[str, float]:
    """Mode-collapse summary: classes holding at least ``min_share`` of the samples, and the label entropy
    divided by log(num_classes) (1 = perfectly balanced, 0 = a single class)."""
    c = (counts if isinstance(counts, torch.Tensor) else torch.as_tensor(np.asarray(counts))).double()
    total = float(c.sum())
    if total <= 0:
        raise ValueError("mode_coverage got an empty histogram")
    p = c / total
    nonzero = p[p > 0]
    entropy = float(-(nonzero * nonzero.log()).sum()) / math.log(len(c)) if len(c) > 1 else 0.0
    return {"classes_covered": int((p >= min_share).sum()), "label_entropy": entropy}


#: k-NN feature choices: the flattened last conv map, the same average-pooled 2x2 (Fashion-MNIST: 256-d, so 2,000
#: reference rows ship in 1 MB), or the penultimate (FD) features
PR_FEATURES = ("conv", "conv_2x2", "penultimate")


# --- evaluators: a classifier's features against a fixed reference --------------------------------------------
class FeatureEvaluator:
    """What every classifier-feature evaluator shares: FD of the penultimate features against the reference
    statistics (``reference_mu``, ``reference_sigma``), k-NN precision/recall against the reference's k-NN
    features (``real_pr_features``), label coverage, and, given the class each sample was asked for, prompt
    alignment. Subclasses set the reference and validate their inputs (:meth:`check_images`)."""

    classifier: DigitsClassifier
    reference_mu: np.ndarray
    reference_sigma: np.ndarray
    real_pr_features: torch.Tensor

    def __init__(self, classifier: DigitsClassifier, k: int, min_share: float, pr_features: str) -> None:
        if pr_features not in PR_FEATURES:
            raise ValueError(f"pr_features must be one of {list(PR_FEATURES)}, got {pr_features!r}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.device = next(self.classifier.parameters()).device
        self.k, self.min_share, self.pr_features = k, min_share, pr_features

    @torch.no_grad()
    def features(
        self, images: torch.Tensor, batch_size: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FD features [N, feature_dim] and precision/recall features [N, D] (float64, CPU), predicted
        labels [N], of images already in the classifier's input format."""
        fd, pr, labels = [], [], []
        for chunk in images.split(batch_size):
            penultimate, conv, logits = self.classifier.forward_all(chunk.to(self.device, torch.float32))
            fd.append(penultimate)
            pr.append(self._pr_view(conv, penultimate))
            labels.append(logits.argmax(dim=1))
        as_f64 = torch.float64
        return torch.cat(fd).to("cpu", as_f64), torch.cat(pr).to("cpu", as_f64), torch.cat(labels).cpu()

    def _pr_view(self, conv: torch.Tensor, penultimate: torch.Tensor) -> torch.Tensor:
        if self.pr_features == "penultimate":
            return penultimate
        if self.pr_features == "conv":
            return conv
        config = self.classifier.config  # conv_2x2: the last conv map average-pooled by 2 (a quarter as wide)
        grid = conv.view(len(conv), config.widths[-1], config.conv_size, config.conv_size)
        return torch.nn.functional.avg_pool2d(grid, 2).flatten(1)

    def _metrics(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        fake, fake_pr, predicted = self.features(images)
        if len(images) > self.k:
            precision, recall = precision_recall(self.real_pr_features, fake_pr, k=self.k)
        else:  # too few samples for k-NN balls; FD still works from 2 on
            precision = recall = float("nan")
        counts = torch.bincount(predicted, minlength=self.classifier.config.num_classes)
        coverage = mode_coverage(counts, self.min_share)
        mu, sigma = feature_statistics(fake)
        metrics = {
            "fd": frechet_distance_from_statistics(self.reference_mu, self.reference_sigma, mu, sigma),
            "precision": precision,
            "recall": recall,
            "classes_covered": coverage["classes_covered"],
            "label_entropy": coverage["label_entropy"],
            "num_samples": len(images),
        }
        if labels is not None:
            metrics["align"] = alignment(predicted, labels)
        return metrics


def alignment(predicted: torch.Tensor, labels: ArrayLike) -> float:
    """Share of samples whose predicted class is the class they were asked for (prompt alignment)."""
    wanted = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    wanted = wanted.reshape(-1).long().cpu()
    if len(wanted) != len(predicted):
        raise ValueError(
            f"got {len(wanted)} labels for {len(predicted)} images: one prompted class per image"
        )
    return float((predicted.cpu() == wanted).double().mean())


class DigitsEvaluator(FeatureEvaluator):
    """All offline metrics for 1x8x8 samples vs. the held-out digits, with the real features computed once.

    FD uses the classifier's 64-d penultimate features (the role of Inception's pool3); precision/recall use
    its flattened conv features by default (``pr_features="conv"``; see ``DigitsClassifier.conv_features``):
    with the 64-d features, 2,000 pure-noise images score precision ~0.5, with the conv features ~0.0.
    Build it once per process (it runs the classifier over the reference set) and call :meth:`evaluate` on
    each batch of samples, e.g. 2,000 per evaluation.
    """

    def __init__(
        self,
        classifier: DigitsClassifier | None = None,
        device: str | torch.device = "cpu",
        k: int = 3,
        min_share: float = 0.05,
        pr_features: str = "conv",
    ) -> None:
        classifier = classifier if classifier is not None else load_digits_classifier(device=device)
        super().__init__(classifier, k, min_share, pr_features)
        self.real_images, self.real_labels = load_digits_tensors("heldout")
        self.real_features, self.real_pr_features, _ = self.features(self.real_images)
        self.reference_mu, self.reference_sigma = feature_statistics(self.real_features)
        self._floor: dict[str, float] | None = None

    @staticmethod
    def check_images(images: torch.Tensor) -> torch.Tensor:
        """Validate [N, 1, 8, 8] floating images and clamp them to [-1, 1] (as sampler output would be)."""
        shape = ", ".join(map(str, DIGITS_SHAPE))
        expected = f"a floating-point tensor of shape [N, {shape}] with values in [-1, 1]"
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"DigitsEvaluator expects {expected}, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != DIGITS_SHAPE:
            raise ValueError(f"DigitsEvaluator expects {expected}, got shape {list(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"DigitsEvaluator expects {expected}, got dtype {images.dtype} "
                "(scale integer images to [-1, 1])"
            )
        if len(images) < 2:
            raise ValueError(f"DigitsEvaluator needs at least 2 images, got shape {list(images.shape)}")
        images = images.detach().float()
        if torch.isnan(images).any():
            raise ValueError(f"DigitsEvaluator got {int(torch.isnan(images).sum())} NaN pixel values")
        return images.clamp(-1.0, 1.0)

    def evaluate(self, images: torch.Tensor, labels: ArrayLike | None = None) -> dict[str, float]:
        """Metrics of generated ``images`` [N, 1, 8, 8] against the held-out digits (keys: fd, precision,
        recall, classes_covered, label_entropy, num_samples; ``align`` too when the class each image was
        asked for is given as ``labels``)."""
        return self._metrics(self.check_images(images), None if labels is None else torch.as_tensor(labels))

    def real_floor(self) -> dict[str, float]:
        """The same metrics for the 1,397 real *train* digits: what a perfect generator would score."""
        if self._floor is None:
            train, _ = load_digits_tensors("train")
            self._floor = self._metrics(train)
        return dict(self._floor)

    def label_histogram(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted-class counts [num_classes] of validated images."""
        return label_histogram(self.classifier, self.check_images(images))


# --- standard FID (optional) --------------------------------------------------------------------------------
def _cached_inception_weights() -> Path | None:
    """Where torch-fidelity's own download would have left the weights (torch hub cache), if it did."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return path if path.is_file() else None


def _to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"inception_fid expects [N, 1 or 3, H, W] images in [-1, 1], got {list(images.shape)}"
        )
    images = images.detach().float().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return ((images + 1.0) * 127.5).round().to(torch.uint8)


def inception_fid(
    fake_images: torch.Tensor,
    real_images: torch.Tensor,
    weights_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> float:
    """The classical FID (Inception-v3 pool3, 2048-d) via torch-fidelity's feature extractor; never downloads.

    Images are [N, C, H, W] in [-1, 1] (greyscale is repeated to RGB; torch-fidelity resizes to 299).
    ``weights_path`` is torch-fidelity's ``feature_extractor_weights_path``: the converted TF Inception
    ``weights-inception-2015-12-05-6726825d.pth``; without it only a copy already in the torch hub cache is
    used.
    On 8x8 digits this number says little (use :class:`DigitsEvaluator`); it is for real image datasets.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise RuntimeError(
            "inception_fid needs torch-fidelity, which is not installed: `pip install torch-fidelity` (or "
            "`pip install torchmetrics[image]`, which pulls it in), then pass weights_path= the InceptionV3 "
            f"weights file {INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_URL}). "
            "For digits use DigitsEvaluator."
        ) from err
    if weights_path is None:
        weights_path = _cached_inception_weights()
        if weights_path is None:
            cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
            raise RuntimeError(
                "inception_fid will not download the InceptionV3 weights. Fetch them once where there is "
                f"network ({INCEPTION_WEIGHTS_URL}) and pass weights_path=... (torch-fidelity's "
                f"feature_extractor_weights_path), or place the file at {cache}."
            )
    elif not Path(weights_path).is_file():
        raise RuntimeError(f"inception_fid: weights file {str(weights_path)!r} does not exist")
    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path)
    ).to(device)

    @torch.no_grad()
    def pool3(images: torch.Tensor) -> torch.Tensor:
        rgb = _to_uint8_rgb(images)
        return torch.cat([extractor(c.to(device))[0].double().cpu() for c in rgb.split(batch_size)])

    return frechet_distance(pool3(real_images), pool3(fake_images))
