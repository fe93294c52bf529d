"""``onestep eval`` and ``onestep sample``: offline quality figures and sample grids for a teacher (multi-step
ODE sampling at a given NFE) or an exported one-step / k-step student.

    onestep eval --model default --nfe 35 --num-samples 5000
    onestep eval --model outputs/sid/student --num-samples 5000
    onestep sample --model outputs/sid/student --out grid.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from distill.evaluation.quality import metrics_for
from distill.pipelines import STUDENT_PIPELINES
from distill.sampling.ode import sample
from distill.teachers.loading import load_teacher, resolve_teacher_path
from engine.images import save_grid


def student_pipeline_class(path: str) -> type | None:
    """The pipeline class of an exported student folder, or None for anything else (a teacher)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    name = json.loads(index.read_text()).get("_class_name")
    if name not in STUDENT_PIPELINES:
        return None
    return STUDENT_PIPELINES[name]


def is_student(path: str) -> bool:
    return student_pipeline_class(path) is not None


@torch.no_grad()
def generate(
    model: str, num_samples: int, nfe: int, method: str, seed: int, batch_size: int = 1000
) -> tuple[torch.Tensor, int]:
    """Samples in [-1, 1] and the NFE spent per sample, from a teacher or an exported student."""
    path = resolve_teacher_path(model)
    generator = torch.Generator().manual_seed(seed)
    pipeline_class = student_pipeline_class(path)
    if pipeline_class is not None:
        pipe = pipeline_class.from_pretrained(path)
        steps = nfe if getattr(pipe.config, "any_steps", False) else None  # flow students sample at any NFE
        chunks = [
            pipe(
                batch_size=min(batch_size, num_samples - i),
                generator=generator,
                num_inference_steps=steps,
                output_type="pt",
            ).images
            for i in range(0, num_samples, batch_size)
        ]
        return torch.cat(chunks), steps or len(pipe.config.step_sigmas)
    teacher = load_teacher(model).eval()
    result = sample(teacher, num_samples, nfe=nfe, method=method, generator=generator, batch_size=batch_size)
    return result.images.clamp(-1, 1), result.nfe


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="default", help="'default', a teacher folder/hub id, or a student folder"
    )
    parser.add_argument(
        "--nfe", type=int, default=35, help="teacher function evaluations (ignored for students)"
    )
    parser.add_argument("--method", choices=["heun", "euler"], default="heun")
    parser.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser("onestep eval").parse_args(argv)
    images, nfe = generate(args.model, args.num_samples, args.nfe, args.method, args.seed)
    metrics = {"model": args.model, "nfe": nfe, **metrics_for(images)}
    print(json.dumps(metrics))
    return 0


def sample_main(argv: list[str] | None = None) -> int:
    parser = _parser("onestep sample")
    parser.add_argument("--out", default="samples.png")
    parser.set_defaults(num_samples=100)
    args = parser.parse_args(argv)
    images, nfe = generate(args.model, args.num_samples, args.nfe, args.method, args.seed)
    path = save_grid(images, args.out, upscale=4)
    print(f"wrote {path} ({len(images)} samples, {nfe} NFE)")
    return 0
