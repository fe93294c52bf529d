"""Distil a shipped Fashion-MNIST text-to-image teacher with SiD-LSG for M minutes and compare: ``--teacher sd``
(the SD-format UNet, VP) or ``--teacher flow`` (the PixArt-format flow-matching transformer, ``fashion-flow``).

1. starts from ``recipes/configs/sid_fashion.yaml`` (prompts: the 132 training captions, ``fashion-captions``);
2. measures the teacher pipeline with ``evaluate_pipeline`` (its own scheduler: DDIM for sd, DPM-Solver on flow
   sigmas for flow; at ``--teacher_steps`` steps, CFG = the student's ``--guidance_scale``, or its
   ``guidance_scale_teacher`` when that is overridden: the guided teacher in G's loss is the one the student is
   compared with): FD in a Fashion-MNIST classifier's features, prompt alignment (training and held-out wording),
   precision / recall;
3. trains SiD for ``--minutes`` of wall time (guidance folded into the student, SiD-LSG);
4. measures the exported one-step student folder the same way: 1 step, CFG 1, same prompts and seeds (sd: the
   plain StableDiffusionPipeline; flow: the folder's OneStepPixArtSigmaPipeline, as the toolkit's own class);
5. prints ``RESULT teacher=sd teacher_fd=.. teacher_align=.. student_fd=.. student_align=..
   student_align_heldout=.. ratio=.. images=.. guidance_scale=..`` (ratio = student_fd / teacher_fd at the
   first of ``--teacher_steps``; ``guidance_scales=k1,k2,k3,k4`` when the four SiD-LSG scales differ) and writes a
   grid of teacher (top) vs. student (bottom) samples.

    python benchmarks/sid_text2image.py --teacher sd --minutes 30
    python benchmarks/sid_text2image.py --teacher flow --minutes 30
    python benchmarks/sid_text2image.py --teacher sd --minutes 8 --eval_samples 500 --guidance_scale 2
    python benchmarks/sid_text2image.py --teacher sd --minutes 30 --student lora lr_generator=3e-4

``export_best=true eval_every=N`` also keeps and measures the EMA student of the in-training evaluation with the
lowest FD (``best_student_fd``, ``best_ratio``, ``best_images``; the in-training evaluation uses other noise).

SiD then SiDA (SiD^2A: the authors' fastest route past the teacher): resume a SiD run's checkpoint with real data
(the RESULT line then ends with ``real_data=``; ``images`` counts both stages, ``--minutes`` this one):

    python benchmarks/sid_text2image.py --minutes 25 --output_dir outputs/sida resume_from=CHECKPOINT \
        real_data=fashion-mnist generator_freeze_images=0 adversarial_start_images=0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from common import parse_overrides, print_result, reset_accelerate, settings_argv
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

from distill.evaluation.text2image import (
    FASHION_REFERENCE,
    FASHION_WEIGHTS,
    evaluate_pipeline,
    file_sha256,
)
from distill.teachers.loading import resolve_teacher_path
from engine.config import parse_config
from engine.images import save_grid
from engine.trainer import Trainer
from recipes.sid import SiDConfig, SiDRecipe

#: --teacher NAME -> the recipes' teacher spec
TEACHERS = {"sd": "fashion-sd", "flow": "fashion-flow"}
#: the SiD settings for these teachers (recipes/configs/sid_fashion.yaml); the benchmark fixes only its own
#: parts (teacher, guidance, student, wall time, evaluation at the end) on top
CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "sid_fashion.yaml"
#: images of each model in the teacher-vs-student grid (two rows of ten classes)
GRID_IMAGES = 20


def measure(
    name: str, pipe: str, samples: int, seed: int, steps: int, cfg: float
) -> tuple[dict, torch.Tensor]:
    """``evaluate_pipeline`` with the wall time printed."""
    start = time.perf_counter()
    metrics, images = evaluate_pipeline(
        pipe, samples, seed=seed, num_inference_steps=steps, guidance_scale=cfg, progress_bar=False
    )
    say_measured(name, steps, cfg, metrics, f"wall_s={time.perf_counter() - start:.0f}")
    return metrics, images


def say_measured(name: str, steps: int, cfg: float, metrics: dict, note: str) -> None:
    print(
        f"{name} steps={steps} cfg={cfg:g} fd={metrics['fd']:.3f} align={metrics['align']:.3f} "
        f"align_heldout={metrics['align_heldout']:.3f} precision={metrics['precision']:.3f} "
        f"recall={metrics['recall']:.3f} {note}",
        flush=True,
    )


def measure_teacher(
    folder: str, samples: int, seed: int, steps: int, cfg: float, cache: Path | None
) -> tuple[dict, torch.Tensor]:
    """:func:`measure` of the teacher, kept in ``cache`` (when given) under a key of everything the figures
    depend on: the teacher folder (its name carries its content hash), samples, seed, steps, CFG and the metric's
    classifier and reference files. A 5,000-sample teacher measurement is ~25 CPU minutes; a run at the same scale
    reuses it. Only the metrics and the grid's first images are kept."""
    if cache is None:
        return measure("teacher", folder, samples, seed, steps, cfg)
    key = {
        "teacher": str(Path(folder).resolve()),
        "samples": samples,
        "seed": seed,
        "steps": steps,
        "cfg": cfg,
        "classifier": file_sha256(FASHION_WEIGHTS),
        "reference": file_sha256(FASHION_REFERENCE),
    }
    path = (
        cache
        / f"teacher_{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.safetensors"
    )
    if path.is_file():
        with safe_open(str(path), "pt") as kept:
            metrics, images = json.loads(kept.metadata()["metrics"]), kept.get_tensor("images")
        say_measured("teacher", steps, cfg, metrics, f"(cached: {path})")
        return metrics, images
    metrics, images = measure("teacher", folder, samples, seed, steps, cfg)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    meta = {"metrics": json.dumps(metrics), "key": json.dumps(key)}
    save_file({"images": images[:GRID_IMAGES].contiguous()}, str(partial), metadata=meta)
    os.replace(partial, path)
    return metrics, images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="sd")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall minutes of SiD training")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="SiD-LSG's kappa = the teacher's CFG (default: the config's, 1.5)",
    )
    parser.add_argument("--eval_samples", type=int, default=2000, help="samples per wording and model")
    parser.add_argument("--eval_seed", type=int, default=0)
    parser.add_argument(
        "--teacher_steps", default="25,50", help="comma-separated sampler steps of the teacher, e.g. 25,50"
    )
    parser.add_argument("--student", choices=["full", "lora"], default="full")
    parser.add_argument("--output_dir", default="outputs/bench_sid_text2image")
    parser.add_argument(
        "--teacher_cache",
        type=Path,
        default=None,
        help="folder keeping teacher measurements for reuse by runs at the same scale (off by default)",
    )
    parser.add_argument("overrides", nargs="*", help="SiD config overrides, e.g. lr_generator=3e-4 alpha=1.2")
    args = parser.parse_args()
    try:
        teacher_steps = [int(s) for s in args.teacher_steps.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--teacher_steps {args.teacher_steps!r} must be comma-separated integers") from None
    if not teacher_steps or min(teacher_steps) < 1:
        raise SystemExit(f"--teacher_steps {args.teacher_steps!r} must name steps >= 1")

    out = Path(args.output_dir)
    spec = TEACHERS[args.teacher]
    fixed = dict(
        teacher=spec,
        student=args.student,
        output_dir=out,
        max_steps=10**9,
        max_minutes=args.minutes,
        eval_every=0,  # one in-training evaluation, at the end (the benchmark's own one follows)
        eval_samples=min(args.eval_samples, 500),
        checkpoint_every=0,
    )
    # the config first: bad keys or values fail here, before the teacher is measured
    if args.guidance_scale is not None:
        fixed["guidance_scale"] = args.guidance_scale
    argv = ["--config", str(CONFIG), *settings_argv(fixed), *parse_overrides(args.overrides)]
    config = parse_config(SiDConfig, argv)

    if args.student == "lora" and not config.lora_export_merged:
        raise SystemExit(
            "--student lora: pass lora_export_merged=true (the evaluation needs a pipeline folder)"
        )

    kappa, scales = compared_scale(config)
    teacher_path = resolve_teacher_path(spec)
    teacher = {}
    for steps in teacher_steps:
        teacher[steps] = measure_teacher(
            teacher_path, args.eval_samples, args.eval_seed, steps, kappa, args.teacher_cache
        )

    start = time.perf_counter()
    trainer = Trainer(config, SiDRecipe(config))
    trainer.fit()
    train_minutes = (time.perf_counter() - start) / 60
    images_seen, steps_done = trainer.images_seen, trainer.step
    del trainer
    reset_accelerate()
    print(f"train wall minutes={train_minutes:.1f} steps={steps_done} images={images_seen}", flush=True)

    student_dir = Path(config.export_dir or out / "student")
    student, student_images = measure(
        "student", pipeline_folder(student_dir, args.student), args.eval_samples, args.eval_seed, 1, 1.0
    )
    best = {}
    # export_best: the EMA of the in-training evaluation with the lowest FD (that evaluation used other noise)
    if config.export_best:
        best_dir = student_dir.with_name(f"{student_dir.name}_best")
        metrics, _ = measure(
            "student_best", pipeline_folder(best_dir, args.student), args.eval_samples, args.eval_seed, 1, 1.0
        )
        facts = ModelCard.load(best_dir / "README.md").data.to_dict()["onestep"]
        best = {"best_student_fd": metrics["fd"], "best_student_align": metrics["align"]}
        best |= {"best_images": facts["generated_images_seen"]}

    ref_steps = teacher_steps[0]
    ref, teacher_images = teacher[ref_steps]
    grid = save_grid(
        torch.cat([teacher_images[:GRID_IMAGES], student_images[:GRID_IMAGES]]),
        out / "teacher_vs_student.png",
        10,
        3,
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
        guidance_scale=kappa,
        **({"guidance_scales": scales} if scales else {}),
        eval_samples=args.eval_samples,
        minutes=args.minutes,
        **({"real_data": config.real_data} if config.real_data else {}),  # SiDA
        **extra,
        **best,
        **({"best_ratio": best["best_student_fd"] / ref["fd"]} if best else {}),
    )


def compared_scale(config: SiDConfig) -> tuple[float, str | None]:
    """The CFG scale the teacher is measured at: that of the guided teacher in G's loss, the one the student is
    distilled from (SiD-LSG's kappa4: ``guidance_scale`` unless ``guidance_scale_teacher`` overrides it); and
    the four scales as ``"k1,k2,k3,k4"`` when they are not all equal (None when they are)."""
    scales = config.guidance_scales()
    listed = None if len(set(scales.values())) == 1 else ",".join(f"{v:g}" for v in scales.values())
    return scales["guidance_scale_teacher"], listed


def pipeline_folder(export: Path, student: str) -> str:
    """The pipeline folder of an export: itself, or for a LoRA student its merged twin (checked above)."""
    return str(export.with_name(f"{export.name}_merged") if student == "lora" else export)


if __name__ == "__main__":
    main()
