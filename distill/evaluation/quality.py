"""Periodic sample-quality evaluation during training: fixed evaluation noise, samples split across processes,
offline metrics on the main process (digits-shaped data), a sample grid, and the best figure so far.

The SiD generator loss is no convergence signal; this is what the progress log shows instead.

The feature metrics (FD, precision/recall, label coverage) use the shipped digits classifier, so they exist
only for 1x8x8 samples. For any other shape nothing but the sample grid and the mean/std of its images would
use the samples, so only :data:`GRID_SAMPLES` are generated (from the first rows of the same fixed noise), and
a note says once per shape why the feature metrics are skipped.

Other image kinds get feature metrics through an explicit ``evaluator`` (an object with ``evaluate(images,
labels=None) -> dict``, e.g. :class:`distill.evaluation.text2image.FashionEvaluator`) and the class each fixed
sample was conditioned on (``sample_labels``: fixed sample indices -> class ids, e.g.
:func:`distill.evaluation.text2image.prompt_labels`), which adds prompt alignment (``align``); then all
``num_samples`` are drawn whatever the shape.

A latent teacher's samples are latents: :func:`evaluate_sampler` and :class:`QualityTracker` take a ``decode``
(e.g. :meth:`distill.teachers.latents.LatentCodec.decode`) applied to each chunk of samples before anything
else, so grids, statistics and the feature-metrics rule are about the decoded images, never the latents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from accelerate.utils import gather
from torch import Tensor

from distill.evaluation.progress import ProgressDenoiser, samples_bar, say, threads_note
from distill.sampling.ode import sample
from distill.teachers.denoiser import Condition, Denoiser

DIGITS_SHAPE = (1, 8, 8)
#: samples generated for shapes without feature metrics: one 8x8 sample grid
GRID_SAMPLES = 64

_EVALUATOR = None
_SKIP_NOTED: set[tuple[int, ...]] = set()


def digits_evaluator():
    """The shipped digits classifier and held-out features, built once per process."""
    global _EVALUATOR
    if _EVALUATOR is None:
        from distill.evaluation.metrics import DigitsEvaluator

        _EVALUATOR = DigitsEvaluator()
    return _EVALUATOR


class SampleEvaluator(Protocol):
    """What :func:`metrics_for` and :class:`QualityTracker` accept as ``evaluator``."""

    def evaluate(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Any]: ...


#: fixed sample indices -> the class each sample was conditioned on (for prompt alignment)
SampleLabels = Callable[[Tensor], Tensor]


def has_feature_metrics(shape: tuple[int, ...], evaluator: SampleEvaluator | None = None) -> bool:
    """Whether FD / precision / recall exist for samples of ``shape`` (C, H, W): digits-shaped ones, or any
    shape with an explicit ``evaluator``."""
    return evaluator is not None or tuple(shape) == DIGITS_SHAPE


def samples_needed(num_samples: int, shape: tuple[int, ...], evaluator: SampleEvaluator | None = None) -> int:
    """All ``num_samples`` where feature metrics apply, else only a grid's worth (they would go unused)."""
    return num_samples if has_feature_metrics(shape, evaluator) else min(num_samples, GRID_SAMPLES)


def note_skipped_metrics(
    shape: tuple[int, ...], num_samples: int, evaluator: SampleEvaluator | None = None
) -> None:
    """Say once per shape (per process) that FD etc. are skipped, why, and how many samples are drawn instead."""
    shape = tuple(int(s) for s in shape)
    if has_feature_metrics(shape, evaluator) or shape in _SKIP_NOTED:
        return
    _SKIP_NOTED.add(shape)
    got, want = "x".join(map(str, shape)), "x".join(map(str, DIGITS_SHAPE))
    say(
        f"eval: FD/precision/recall skipped for {got} samples (their features come from the digits classifier, "
        f"which only reads {want} images); each evaluation draws {samples_needed(num_samples, shape)} samples "
        f"for the sample grid and their mean/std instead of {num_samples}"
    )


def metrics_for(
    images: torch.Tensor, evaluator: SampleEvaluator | None = None, labels: Tensor | None = None
) -> dict[str, float]:
    """Offline metrics by ``evaluator`` (with prompt alignment when ``labels``, the class each image was
    conditioned on, are given) or, without one, of digits-shaped images; else only the images' statistics.

    Samples with non-finite pixels are dropped (as SiD's code does) and counted as ``nonfinite_samples``.
    """
    finite = torch.isfinite(images.flatten(1)).all(dim=1)
    dropped = int((~finite).sum())
    images = images[finite]
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        if len(labels) != len(finite):
            raise ValueError(f"metrics_for got {len(labels)} labels for {len(finite)} images")
        labels = labels[finite.to(labels.device)]
    if len(images) < 2:
        return {"nonfinite_samples": float(dropped)}
    if evaluator is not None:
        metrics = {k: float(v) for k, v in evaluator.evaluate(images, labels).items()}
    elif has_feature_metrics(tuple(images.shape[1:])):
        metrics = {k: float(v) for k, v in digits_evaluator().evaluate(images, labels).items()}
    else:
        metrics = {
            "mean": float(images.mean()),
            "std": float(images.std()),
            "num_samples": float(len(images)),
        }
    metrics["nonfinite_samples"] = float(dropped)
    return metrics


#: latents -> images in [-1, 1] (e.g. ``LatentCodec.decode``), for latent teachers and students
Decode = Callable[[Tensor], Tensor]
#: samples decoded at once
DECODE_CHUNK = 500


def decoded_shape(
    shape: tuple[int, ...], decode: Decode | None, device: torch.device | str = "cpu"
) -> tuple[int, ...]:
    """(C, H, W) of what ``decode`` makes of one sample of ``shape`` (found by decoding zeros once), or
    ``shape`` itself without a decode."""
    if decode is None:
        return tuple(shape)
    with torch.no_grad():
        return tuple(int(s) for s in decode(torch.zeros(1, *shape, device=device)).shape[1:])


def decode_in_chunks(samples: Tensor, decode: Decode | None, chunk: int = DECODE_CHUNK) -> Tensor:
    """``decode`` over ``samples`` a chunk at a time (float32); ``samples`` as they are without a decode."""
    if decode is None:
        return samples
    with torch.no_grad():
        return torch.cat([decode(part).float() for part in samples.split(chunk)])


def sample_shape(denoiser: Denoiser) -> tuple[int, int, int]:
    """(C, H, W) of the denoiser's samples."""
    size = denoiser.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(denoiser.in_channels), int(h), int(w))


def sample_with_bar(
    denoiser: Denoiser, num_samples: int, nfe: int, desc: str, enabled: bool = True, **sample_kwargs
):
    """:func:`distill.sampling.ode.sample` with a bar that moves on every network call (``sample_kwargs``:
    method, generator, cond, guidance_scale, batch_size)."""
    with samples_bar(num_samples, desc, enabled=enabled) as bar:
        return sample(ProgressDenoiser(denoiser, bar, nfe), num_samples, nfe=nfe, **sample_kwargs)


def evaluate_sampler(
    denoiser: Denoiser,
    num_samples: int,
    nfe: int,
    seed: int = 0,
    method: str = "heun",
    num_classes: int | None = None,
    guidance_scale: float = 1.0,
    progress_bar: bool = True,
    decode: Decode | None = None,
    evaluator: SampleEvaluator | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of a multi-step teacher sampler at ``nfe`` function evaluations (one process), and the samples
    (images: decoded by ``decode`` for a latent teacher).

    Class-conditional teachers are sampled with labels cycling through the classes (and scored for alignment
    with them). For image shapes without feature metrics (no digits, no ``evaluator``) only
    :func:`samples_needed` samples are drawn: the first ones of the full run's noise.
    """
    params = denoiser.parameters() if hasattr(denoiser, "parameters") else iter(())
    device = next(params, torch.empty(0)).device
    shape = decoded_shape(sample_shape(denoiser), decode, device)
    count = samples_needed(num_samples, shape, evaluator)
    note_skipped_metrics(shape, num_samples, evaluator)
    generator = torch.Generator().manual_seed(seed)
    cond = labels = None
    if num_classes is not None:
        labels = torch.arange(count) % num_classes
        cond = Condition(class_labels=labels)
    desc = f"eval: {count} samples at NFE {nfe} ({threads_note(device)})"
    result = sample_with_bar(
        denoiser,
        count,
        nfe,
        desc,
        progress_bar,
        method=method,
        generator=generator,
        cond=cond,
        guidance_scale=guidance_scale,
    )
    images = decode_in_chunks(result.images, decode).clamp(-1, 1)
    metrics = metrics_for(images, evaluator, labels if evaluator is not None else None)
    metrics["nfe"] = float(result.nfe)
    return metrics, images


class QualityTracker:
    """Evaluates a sampling function ``f(z, cond) -> x0`` on fixed noise, split across processes.

    ``shape`` is the shape of ``f``'s input noise and output samples; ``decode`` (latent models) turns each
    chunk of samples into images before clipping, metrics and the grid, and ``image_shape`` is then what it
    makes of one sample. Digits-shaped images, or any with an ``evaluator``, get all ``num_samples``; other
    shapes only :data:`GRID_SAMPLES` (see the module docstring). The bar (main process) follows
    ``trainer.config.progress_bar``.
    """

    def __init__(
        self,
        trainer,
        num_samples: int,
        seed: int,
        shape: tuple[int, ...],
        num_classes: int | None = None,
        decode: Decode | None = None,
        conditions: Callable[[torch.Tensor], Condition | None] | None = None,
        evaluator: SampleEvaluator | None = None,
        sample_labels: SampleLabels | None = None,
        sample_prompts: Callable[[Tensor], Tensor] | None = None,
    ):
        """``conditions`` (fixed sample indices -> their condition, e.g. ``ConditionSource.fixed(i)[0]``)
        replaces the labels cycling through ``num_classes`` when given (prompts).

        ``evaluator`` (e.g. ``FashionEvaluator``) computes the metrics instead of the digits rule; it gets the
        class of every sample, for prompt alignment, from ``sample_labels`` (fixed sample indices -> class ids,
        e.g. ``text2image.prompt_labels(prompts)``), else from the labels cycling through ``num_classes``.

        ``sample_prompts`` (fixed sample indices -> prompt indices, e.g. ``text2image.balanced_prompt_order``)
        picks which prompt each fixed sample gets; ``conditions`` and ``sample_labels`` then see prompt indices.
        Without it sample ``i`` is passed on as is."""
        self.trainer = trainer
        self.device = trainer.device
        self.shape = tuple(shape)
        self.decode = decode
        self.image_shape = decoded_shape(self.shape, decode, self.device)
        self.evaluator = evaluator
        count = samples_needed(num_samples, self.image_shape, evaluator)
        if trainer.accelerator.is_main_process:
            note_skipped_metrics(self.image_shape, num_samples, evaluator)
        noise_gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(count, *self.shape, generator=noise_gen)
        self.labels = (
            None if num_classes is None or conditions is not None else torch.arange(count) % num_classes
        )
        self.conditions = conditions
        if sample_prompts is not None and conditions is None:
            raise ValueError("sample_prompts needs conditions (prompt indices -> their condition)")
        # what conditions and sample_labels are asked about for each fixed sample
        self.condition_index = torch.arange(count)
        if sample_prompts is not None:
            self.condition_index = torch.as_tensor(sample_prompts(self.condition_index)).long().cpu()
        self.sample_labels: Tensor | None = None  # the class of each fixed sample, for the evaluator
        if evaluator is not None:
            if sample_labels is not None:
                self.sample_labels = torch.as_tensor(sample_labels(self.condition_index)).long().cpu()
            elif self.labels is not None:
                self.sample_labels = self.labels
        self.best: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.last_grid: str | None = None

    @torch.no_grad()
    def evaluate(
        self,
        sample_fn: Callable[[torch.Tensor, Condition | None], torch.Tensor],
        tag: str,
        track: bool = True,
    ) -> dict[str, float]:
        """Metrics of ``sample_fn`` on the fixed noise; ``track=False`` leaves :attr:`history`, :attr:`best` and
        :attr:`last_grid` alone (a side measurement, e.g. the raw generator next to its EMA)."""
        acc = self.trainer.accelerator
        rank, world = acc.process_index, acc.num_processes
        per = -(-len(self.noise) // world)
        idx = torch.arange(rank * per, (rank + 1) * per) % len(self.noise)
        show = acc.is_main_process and getattr(getattr(self.trainer, "config", None), "progress_bar", True)
        where = f"{world} processes" if world > 1 else threads_note(self.device)
        desc = f"eval {tag}: {len(self.noise)} samples ({where})"
        images = []
        with samples_bar(len(idx), desc, enabled=show, leave=False) as bar:
            for chunk in idx.split(500):
                z = self.noise[chunk].to(self.device)
                if self.conditions is not None:
                    cond = self.conditions(self.condition_index[chunk])
                    cond = None if cond is None else cond.to(self.device)
                else:
                    labels = None if self.labels is None else self.labels[chunk].to(self.device)
                    cond = None if labels is None else Condition(class_labels=labels)
                samples = sample_fn(z, cond)
                if self.decode is not None:  # back on this process's device for the gather
                    samples = self.decode(samples).to(self.device)
                images.append(samples.float().clamp(-1, 1))
                bar.update(len(chunk))
        images = gather(torch.cat(images))[: len(self.noise)]
        if not acc.is_main_process:
            return {}
        metrics = metrics_for(images.cpu(), self.evaluator, self.sample_labels)
        path = self.trainer.log_images(tag, images[:100], upscale=4)
        if not track:
            return metrics
        self.last_grid = str(path) if path else None
        self.history.append(
            {**metrics, "images_seen": float(self.trainer.images_seen), "step": float(self.trainer.step)}
        )
        if "fd" in metrics and metrics["fd"] < self.best.get("fd", float("inf")):
            self.best = {**metrics, "images_seen": float(self.trainer.images_seen)}
        return metrics
