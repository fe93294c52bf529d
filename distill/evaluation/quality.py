"""Periodic sample-quality evaluation during training: fixed evaluation noise, samples split across processes,
offline metrics on the main process (digits-shaped data), a sample grid, and the best figure so far.

The SiD generator loss is no convergence signal; this is what the progress log shows instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate.utils import gather

from distill.sampling.ode import sample
from distill.teachers.denoiser import Condition, Denoiser

DIGITS_SHAPE = (1, 8, 8)

_EVALUATOR = None


def digits_evaluator():
    """The shipped digits classifier and held-out features, built once per process."""
    global _EVALUATOR
    if _EVALUATOR is None:
        from distill.evaluation.metrics import DigitsEvaluator

        _EVALUATOR = DigitsEvaluator()
    return _EVALUATOR


def metrics_for(images: torch.Tensor) -> dict[str, float]:
    """Offline metrics when the images are digits-shaped, else only their statistics.

    Samples with non-finite pixels are dropped (as SiD's code does) and counted as ``nonfinite_samples``.
    """
    finite = torch.isfinite(images.flatten(1)).all(dim=1)
    dropped = int((~finite).sum())
    images = images[finite]
    if len(images) < 2:
        return {"nonfinite_samples": float(dropped)}
    if tuple(images.shape[1:]) == DIGITS_SHAPE:
        metrics = {k: float(v) for k, v in digits_evaluator().evaluate(images).items()}
    else:
        metrics = {"mean": float(images.mean()), "std": float(images.std())}
    metrics["nonfinite_samples"] = float(dropped)
    return metrics


def evaluate_sampler(
    denoiser: Denoiser,
    num_samples: int,
    nfe: int,
    seed: int = 0,
    method: str = "heun",
    num_classes: int | None = None,
    guidance_scale: float = 1.0,
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of a multi-step teacher sampler at ``nfe`` function evaluations (one process).

    Class-conditional teachers are sampled with labels cycling through the classes.
    """
    generator = torch.Generator().manual_seed(seed)
    cond = None
    if num_classes is not None:
        cond = Condition(class_labels=torch.arange(num_samples) % num_classes)
    result = sample(
        denoiser,
        num_samples,
        nfe=nfe,
        method=method,
        generator=generator,
        cond=cond,
        guidance_scale=guidance_scale,
    )
    images = result.images.clamp(-1, 1)
    metrics = metrics_for(images)
    metrics["nfe"] = float(result.nfe)
    return metrics, images


class QualityTracker:
    """Evaluates a sampling function ``f(z, cond) -> x0`` on fixed noise, split across processes."""

    def __init__(
        self, trainer, num_samples: int, seed: int, shape: tuple[int, ...], num_classes: int | None = None
    ):
        self.trainer = trainer
        self.device = trainer.device
        noise_gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(num_samples, *shape, generator=noise_gen)
        self.labels = None if num_classes is None else torch.arange(num_samples) % num_classes
        self.best: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.last_grid: str | None = None

    @torch.no_grad()
    def evaluate(
        self, sample_fn: Callable[[torch.Tensor, Condition | None], torch.Tensor], tag: str
    ) -> dict[str, float]:
        acc = self.trainer.accelerator
        rank, world = acc.process_index, acc.num_processes
        per = -(-len(self.noise) // world)
        idx = torch.arange(rank * per, (rank + 1) * per) % len(self.noise)
        images = []
        for chunk in idx.split(500):
            z = self.noise[chunk].to(self.device)
            cond = None if self.labels is None else Condition(class_labels=self.labels[chunk].to(self.device))
            images.append(sample_fn(z, cond).float().clamp(-1, 1))
        images = gather(torch.cat(images))[: len(self.noise)]
        if not acc.is_main_process:
            return {}
        metrics = metrics_for(images.cpu())
        path = self.trainer.log_images(tag, images[:100], upscale=4)
        self.last_grid = str(path) if path else None
        self.history.append(
            {**metrics, "images_seen": float(self.trainer.images_seen), "step": float(self.trainer.step)}
        )
        if "fd" in metrics and metrics["fd"] < self.best.get("fd", float("inf")):
            self.best = {**metrics, "images_seen": float(self.trainer.images_seen)}
        return metrics
