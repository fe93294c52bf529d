"""Distil a shipped Fashion-MNIST text-to-image teacher with SiD-LSG for M minutes and compare: ``--teacher sd``
(the SD-format UNet, VP) or ``--teacher flow`` (the PixArt-format flow-matching transformer, ``fashion-flow``).

1. writes the training captions (every template x class name, ``all_captions``) as SiD's prompts file;
2. measures the teacher pipeline with ``evaluate_pipeline`` (its own scheduler: DDIM for sd, DPM-Solver on flow
   sigmas for flow; at ``--teacher_steps`` steps, CFG = the student's ``--guidance_scale``): FD in a Fashion-MNIST classifier's features, prompt
   alignment (training and held-out wording), precision / recall;
3. trains SiD for ``--minutes`` of wall time (guidance folded into the student, SiD-LSG);
4. measures the exported one-step student folder the same way: 1 step, CFG 1, same prompts and seeds (sd: the
   plain StableDiffusionPipeline; flow: the folder's OneStepPixArtSigmaPipeline, as the toolkit's own class);
5. prints ``RESULT teacher=sd teacher_fd=.. teacher_align=.. student_fd=.. student_align=..
   student_align_heldout=.. ratio=.. images=.. guidance_scale=..`` (ratio = student_fd / teacher_fd at the
   first of ``--teacher_steps``) and writes a grid of teacher (top) vs. student (bottom) samples.

    python benchmarks/sid_text2image.py --teacher sd --minutes 30
    python benchmarks/sid_text2image.py --teacher flow --minutes 30
    python benchmarks/sid_text2image.py --teacher sd --minutes 8 --eval_samples 500 --guidance_scale 2
    python benchmarks/sid_text2image.py --teacher sd --minutes 30 --student lora lr_generator=3e-4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import parse_overrides, print_result, reset_accelerate, settings_argv

from distill.evaluation.text2image import evaluate_pipeline
from distill.fashion_mnist import FASHION_CLASSES, all_captions
from distill.teachers.loading import resolve_teacher_path
from engine.config import parse_config
from engine.images import save_grid
from engine.trainer import Trainer
from recipes.sid import SiDConfig, SiDRecipe

#: --teacher NAME -> the recipes' teacher spec
TEACHERS = {"sd": "fashion-sd", "flow": "fashion-flow"}
#: a small-model SiD setting for the few-million-parameter teachers (the rest are SiD-LSG's defaults)
SMALL_MODEL = dict(
    batch_size=32,
    lr_generator=1e-4,
    lr_fake_score=1e-4,
    ema_halflife_images=20_000,
    log_every=50,
    checkpoint_every=0,
    eval_every=0,  # one in-training evaluation, at the end (the benchmark's own one follows)
)


def write_prompts(path: Path) -> Path:
    """The training captions, one a line (every template x name of every class)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [c for label in range(len(FASHION_CLASSES)) for c in all_captions(label)]
    path.write_text("\n".join(lines) + "\n")
    print(f"prompts: {len(lines)} training captions -> {path}", flush=True)
    return path


def measure(
    name: str, pipe: str, samples: int, seed: int, steps: int, cfg: float
) -> tuple[dict, torch.Tensor]:
    """``evaluate_pipeline`` with the wall time printed."""
    start = time.perf_counter()
    metrics, images = evaluate_pipeline(
        pipe, samples, seed=seed, num_inference_steps=steps, guidance_scale=cfg, progress_bar=False
    )
    print(
        f"{name} steps={steps} cfg={cfg:g} fd={metrics['fd']:.3f} align={metrics['align']:.3f} "
        f"align_heldout={metrics['align_heldout']:.3f} precision={metrics['precision']:.3f} "
        f"recall={metrics['recall']:.3f} wall_s={time.perf_counter() - start:.0f}",
        flush=True,
    )
    return metrics, images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="sd")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall minutes of SiD training")
    parser.add_argument(
        "--guidance_scale", type=float, default=3.0, help="SiD-LSG's kappa = the teacher's CFG"
    )
    parser.add_argument("--eval_samples", type=int, default=2000, help="samples per wording and model")
    parser.add_argument("--eval_seed", type=int, default=0)
    parser.add_argument(
        "--teacher_steps", default="25,50", help="comma-separated sampler steps of the teacher, e.g. 25,50"
    )
    parser.add_argument("--student", choices=["full", "lora"], default="full")
    parser.add_argument("--output_dir", default="outputs/bench_sid_text2image")
    parser.add_argument("overrides", nargs="*", help="SiD config overrides, e.g. lr_generator=3e-4 alpha=1.2")
    args = parser.parse_args()
    try:
        teacher_steps = [int(s) for s in args.teacher_steps.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--teacher_steps {args.teacher_steps!r} must be comma-separated integers") from None
    if not teacher_steps or min(teacher_steps) < 1:
        raise SystemExit(f"--teacher_steps {args.teacher_steps!r} must name steps >= 1")

    out = Path(args.output_dir)
    prompts = write_prompts(out / "prompts.txt")
    spec = TEACHERS[args.teacher]
    fixed = dict(
        SMALL_MODEL,
        teacher=spec,
        prompts=prompts,
        guidance_scale=args.guidance_scale,
        student=args.student,
        output_dir=out,
        max_steps=10**9,
        max_minutes=args.minutes,
        eval_samples=min(args.eval_samples, 500),
    )
    # the config first: bad keys or values fail here, before the teacher is measured
    config = parse_config(SiDConfig, [*settings_argv(fixed), *parse_overrides(args.overrides)])

    if args.student == "lora" and not config.lora_export_merged:
        raise SystemExit(
            "--student lora: pass lora_export_merged=true (the evaluation needs a pipeline folder)"
        )

    teacher_path = resolve_teacher_path(spec)
    teacher = {}
    for steps in teacher_steps:
        teacher[steps] = measure(
            "teacher", teacher_path, args.eval_samples, args.eval_seed, steps, args.guidance_scale
        )

    start = time.perf_counter()
    trainer = Trainer(config, SiDRecipe(config))
    trainer.fit()
    train_minutes = (time.perf_counter() - start) / 60
    images_seen, steps_done = trainer.images_seen, trainer.step
    del trainer
    reset_accelerate()
    print(f"train wall minutes={train_minutes:.1f} steps={steps_done} images={images_seen}", flush=True)

    student_dir = config.export_dir or str(out / "student")
    if args.student == "lora":  # the merged pipeline folder (checked above)
        student_dir = str(Path(student_dir).parent / f"{Path(student_dir).name}_merged")
    student, student_images = measure("student", student_dir, args.eval_samples, args.eval_seed, 1, 1.0)

    ref_steps = teacher_steps[0]
    ref, teacher_images = teacher[ref_steps]
    grid = save_grid(
        torch.cat([teacher_images[:20], student_images[:20]]), out / "teacher_vs_student.png", 10, 3
    )
    print(f"grid: {grid} (rows 1-2 teacher, {ref_steps} steps; rows 3-4 one-step student; a class a column)")
    extra = {f"teacher_fd_{s}steps": teacher[s][0]["fd"] for s in teacher_steps[1:]}
    print_result(
        teacher=args.teacher,
        student=args.student,
        teacher_fd=ref["fd"],
        teacher_align=ref["align"],
        teacher_align_heldout=ref["align_heldout"],
        teacher_steps=ref_steps,
        student_fd=student["fd"],
        student_align=student["align"],
        student_align_heldout=student["align_heldout"],
        student_precision=student["precision"],
        student_recall=student["recall"],
        ratio=student["fd"] / ref["fd"],
        images=images_seen,
        steps=steps_done,
        guidance_scale=args.guidance_scale,
        eval_samples=args.eval_samples,
        minutes=args.minutes,
        **extra,
    )


if __name__ == "__main__":
    main()
