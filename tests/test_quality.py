"""In-training evaluation scales with what is measured: shapes without feature metrics draw only a sample grid's
worth of samples (and say why once), while the digits path keeps its exact noise, samples and figures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from tiny_models import tiny_edm_teacher

from distill.evaluation import quality
from distill.evaluation.metrics import DigitsEvaluator, frechet_distance
from distill.evaluation.quality import GRID_SAMPLES, QualityTracker, evaluate_sampler
from distill.sampling.ode import sample
from distill.teachers.denoiser import Condition, Denoiser

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(quality, "_SKIP_NOTED", set())


class CountingDenoiser(torch.nn.Module):
    """A stand-in teacher of any shape that counts the samples it is asked to denoise."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.in_channels, self.sample_size = channels, size
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.rows = 0

    def forward(self, x, sigma, cond=None):
        self.rows += x.shape[0]
        return x * self.scale / (1 + sigma)


def test_evaluate_sampler_on_another_shape_draws_only_the_grid(capsys):
    fake = CountingDenoiser(3, 16)
    metrics, images = evaluate_sampler(fake, num_samples=5000, nfe=3, seed=1)
    assert fake.rows == GRID_SAMPLES * 3  # 3 evaluations of 64 samples, not of 5000
    assert images.shape == (GRID_SAMPLES, 3, 16, 16)
    assert "fd" not in metrics and metrics["num_samples"] == GRID_SAMPLES and metrics["nfe"] == 3
    direct = sample(fake, GRID_SAMPLES, nfe=3, generator=torch.Generator().manual_seed(1)).images.clamp(-1, 1)
    torch.testing.assert_close(images, direct, rtol=0, atol=0)  # the first samples of the full run's noise
    assert metrics["mean"] == pytest.approx(float(direct.mean())) and metrics["std"] == pytest.approx(
        float(direct.std())
    )
    err = capsys.readouterr().err
    assert "FD/precision/recall skipped for 3x16x16" in err and "64 samples" in err and "5000" in err
    assert f"eval: {GRID_SAMPLES} samples at NFE 3 ({torch.get_num_threads()} threads)" in err
    evaluate_sampler(fake, num_samples=5000, nfe=3, seed=1, progress_bar=False)
    assert "skipped" not in capsys.readouterr().err  # said once per shape


def test_evaluate_sampler_digits_path_is_unchanged(tmp_path):
    teacher = Denoiser.from_pretrained(tiny_edm_teacher(tmp_path / "t", num_classes=3)).eval()
    metrics, images = evaluate_sampler(
        teacher, num_samples=40, nfe=3, seed=0, num_classes=3, progress_bar=False
    )
    # what evaluate_sampler computed before progress bars: one sample() call over all samples
    from distill.teachers.denoiser import Condition

    cond = Condition(class_labels=torch.arange(40) % 3)
    direct = sample(teacher, 40, nfe=3, generator=torch.Generator().manual_seed(0), cond=cond).images.clamp(
        -1, 1
    )
    torch.testing.assert_close(images, direct, rtol=0, atol=0)
    evaluator = DigitsEvaluator()
    expected = evaluator.evaluate(direct)
    assert metrics["fd"] == pytest.approx(expected["fd"], rel=1e-12)
    assert metrics["fd"] == pytest.approx(
        frechet_distance(evaluator.real_features, evaluator.features(direct)[0])
    )
    assert (metrics["precision"], metrics["recall"]) == (expected["precision"], expected["recall"])
    assert metrics["num_samples"] == 40 and metrics["nfe"] == 3


def fake_trainer(tmp_path):
    logged = []

    def log_images(tag, images, upscale=1):
        logged.append(images)
        return tmp_path / f"{tag}.png"

    trainer = SimpleNamespace(
        accelerator=Accelerator(cpu=True),
        device=torch.device("cpu"),
        config=SimpleNamespace(progress_bar=False),
        images_seen=10,
        step=1,
        log_images=log_images,
    )
    return trainer, logged


def test_tracker_on_another_shape_generates_only_the_grid(tmp_path, capsys):
    trainer, logged = fake_trainer(tmp_path)
    seen = []

    def sample_fn(z, cond):
        seen.append(len(z))
        return torch.tanh(z)

    tracker = QualityTracker(trainer, num_samples=5000, seed=3, shape=(3, 32, 32))
    QualityTracker(trainer, num_samples=5000, seed=3, shape=(3, 32, 32))  # e.g. reflow: one per NFE
    assert capsys.readouterr().err.count("FD/precision/recall skipped for 3x32x32") == 1
    metrics = tracker.evaluate(sample_fn, tag="g")
    assert sum(seen) == GRID_SAMPLES
    full = torch.randn(GRID_SAMPLES, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert set(metrics) == {"mean", "std", "num_samples", "nonfinite_samples"}
    assert metrics["mean"] == pytest.approx(float(torch.tanh(full).mean()), abs=1e-6)
    assert metrics["std"] == pytest.approx(float(torch.tanh(full).std()), abs=1e-6)
    assert logged[0].shape == (GRID_SAMPLES, 3, 32, 32) and tracker.last_grid.endswith("g.png")


def test_tracker_digits_path_keeps_all_samples_and_the_same_noise(tmp_path):
    trainer, _ = fake_trainer(tmp_path)
    tracker = QualityTracker(trainer, num_samples=600, seed=5, shape=(1, 8, 8), num_classes=10)
    # the noise every earlier benchmark evaluated on
    torch.testing.assert_close(
        tracker.noise, torch.randn(600, 1, 8, 8, generator=torch.Generator().manual_seed(5)), rtol=0, atol=0
    )
    seen = []

    def sample_fn(z, cond):
        seen.append(cond.class_labels.clone())
        return torch.tanh(z)

    metrics = tracker.evaluate(sample_fn, tag="digits")
    assert [len(s) for s in seen] == [500, 100]
    assert torch.equal(torch.cat(seen), torch.arange(600) % 10)
    expected = DigitsEvaluator().evaluate(torch.tanh(tracker.noise))
    assert metrics["fd"] == pytest.approx(expected["fd"], rel=1e-9)
    assert tracker.best["fd"] == metrics["fd"] and tracker.history[0]["step"] == 1.0


def test_tracker_conditions_replace_the_class_labels(tmp_path):
    """A condition callable (prompts: ConditionSource.fixed) gets each chunk's fixed sample indices."""
    trainer, _ = fake_trainer(tmp_path)
    asked, seen = [], []

    def conditions(indices):
        asked.append(indices.clone())
        return Condition(encoder_hidden_states=indices.float().view(-1, 1, 1))

    tracker = QualityTracker(
        trainer, num_samples=600, seed=5, shape=(1, 8, 8), num_classes=10, conditions=conditions
    )
    assert tracker.labels is None

    def sample_fn(z, cond):
        seen.append(cond.encoder_hidden_states.flatten())
        return torch.tanh(z)

    tracker.evaluate(sample_fn, tag="digits")
    assert torch.equal(torch.cat(asked), torch.arange(600)) and [len(a) for a in asked] == [500, 100]
    assert torch.equal(torch.cat(seen), torch.arange(600).float())
