"""``onestep eval`` and ``onestep sample``: offline quality figures and sample grids for a teacher (multi-step
ODE sampling at a given NFE) or an exported one-step / k-step student.

    onestep eval --model default --nfe 35 --num-samples 5000
    onestep eval --model outputs/sid/student --num-samples 5000
    onestep sample --model outputs/sid/student --out grid.png

FD, precision and recall use the shipped digits classifier and exist only for 1x8x8 models; for any other
shape ``onestep eval`` reports the mean/std of a sample grid's worth of images and says so. A latent teacher's
samples are decoded by its own autoencoder (:class:`~distill.teachers.latents.LatentCodec`) first, so metrics,
statistics and grids are of images.
"""

from __future__ import annotations

import argparse
import json

import torch

from distill.evaluation.progress import samples_bar, say, threads_note
from distill.evaluation.quality import (
    decode_in_chunks,
    metrics_for,
    note_skipped_metrics,
    sample_shape,
    sample_with_bar,
    samples_needed,
)
from distill.pipelines import student_pipeline_class
from distill.teachers.latents import LatentCodec
from distill.teachers.loading import load_teacher, resolve_teacher_path
from engine.images import save_grid


def is_student(path: str) -> bool:
    return student_pipeline_class(path) is not None


@torch.no_grad()
def generate(
    model: str,
    num_samples: int,
    nfe: int,
    method: str,
    seed: int,
    batch_size: int = 1000,
    progress_bar: bool = True,
    only_what_metrics_use: bool = False,
    verb: str = "eval",
) -> tuple[torch.Tensor, int]:
    """Samples in [-1, 1] and the NFE spent per sample, from a teacher or an exported student.

    ``only_what_metrics_use``: draw only :func:`samples_needed` samples (the first ones of the same noise)
    when the model's shape has no feature metrics.
    """
    path = resolve_teacher_path(model)
    generator = torch.Generator().manual_seed(seed)
    pipeline_class = student_pipeline_class(path)
    if pipeline_class is not None:
        say(f"{verb}: loading {pipeline_class.__name__} from {path}")
        pipe = pipeline_class.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        shape = sample_shape(pipe.denoiser)
        if only_what_metrics_use:
            note_skipped_metrics(shape, num_samples)
            num_samples = samples_needed(num_samples, shape)
        steps = nfe if getattr(pipe.config, "any_steps", False) else None  # flow students sample at any NFE
        spent = steps or len(pipe.config.step_sigmas)
        desc = f"{verb}: {num_samples} samples at NFE {spent} ({threads_note(pipe.device)})"
        chunks = []
        with samples_bar(num_samples, desc, enabled=progress_bar) as bar:
            for i in range(0, num_samples, batch_size):
                n = min(batch_size, num_samples - i)
                chunks.append(
                    pipe(
                        batch_size=n, generator=generator, num_inference_steps=steps, output_type="pt"
                    ).images
                )
                bar.update(n)
        return torch.cat(chunks), spent
    say(f"{verb}: loading teacher {path}")
    teacher = load_teacher(model).eval()
    codec = LatentCodec.from_teacher(path)  # None for pixel-space teachers
    shape = sample_shape(teacher)
    if codec is not None:
        say(f"{verb}: decoding latents with {codec!r}")
        codec.to(next(teacher.parameters()).device)
        shape = codec.image_shape_for(shape)
    if only_what_metrics_use:
        note_skipped_metrics(shape, num_samples)
        num_samples = samples_needed(num_samples, shape)
    desc = f"{verb}: {num_samples} samples at NFE {nfe}, {method} ({threads_note(next(teacher.parameters()).device)})"
    result = sample_with_bar(
        teacher,
        num_samples,
        nfe,
        desc,
        progress_bar,
        method=method,
        generator=generator,
        batch_size=batch_size,
    )
    images = decode_in_chunks(result.images, None if codec is None else codec.decode, batch_size)
    return images.clamp(-1, 1), result.nfe


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help."""


def _parser(prog: str, what: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument(
        "--model", default="default", help="'default', a teacher folder/hub id, or a student folder"
    )
    parser.add_argument(
        "--nfe",
        type=int,
        default=35,
        help="teacher function evaluations per sample (Heun: odd); ignored by fixed-step students",
    )
    parser.add_argument("--method", choices=["heun", "euler"], default="heun", help="teacher ODE solver")
    parser.add_argument(
        "--num-samples", "--num_samples", dest="num_samples", type=int, default=5000, help=what
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, default=1000, help="samples per batch"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar on stderr",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser("onestep eval", "samples to evaluate (FD etc. need 1x8x8 models; other shapes use 64)")
    args = parser.parse_args(argv)
    images, nfe = generate(
        args.model,
        args.num_samples,
        args.nfe,
        args.method,
        args.seed,
        batch_size=args.batch_size,
        progress_bar=args.progress,
        only_what_metrics_use=True,
    )
    say(f"eval: metrics of {len(images)} samples")
    metrics = {"model": args.model, "nfe": nfe, **metrics_for(images)}
    print(json.dumps(metrics))
    return 0


def sample_main(argv: list[str] | None = None) -> int:
    parser = _parser("onestep sample", "samples in the grid")
    parser.add_argument("--out", default="samples.png", help="PNG file for the sample grid")
    parser.set_defaults(num_samples=100)
    args = parser.parse_args(argv)
    images, nfe = generate(
        args.model,
        args.num_samples,
        args.nfe,
        args.method,
        args.seed,
        batch_size=args.batch_size,
        progress_bar=args.progress,
        verb="sample",
    )
    path = save_grid(images, args.out, upscale=4)
    print(f"wrote {path} ({len(images)} samples, {nfe} NFE)")
    return 0
