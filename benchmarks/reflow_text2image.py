"""InstaFlow on the shipped Fashion-MNIST text-to-image teacher (SD format) in M minutes, measured on prompts.

1. takes the 132 training captions (``fashion-captions``) as the prompts of reflow's pairs;
2. runs ``recipes/reflow.py``'s stages (pairs made by the guided teacher at ``--guidance_scale`` -> 2-rectified
   flow trained on each pair's prompt -> one-step student distilled from it), the wall time split as
   ``common.REFLOW_SPLIT`` (pairs 35 %, reflow 35 %, distillation 15 %; the rest is evaluation);
3. measures the teacher pipeline (its own DDIM scheduler at ``--teacher_steps``, CFG ``--guidance_scale``), the
   exported 2-rectified flow at one Euler step and the exported student at one step (both without CFG: the
   guidance is in the pairs), with ``evaluate_pipeline`` on the same prompts and seeds: FD in the Fashion-MNIST
   classifier's features, prompt alignment (training and held-out wording), precision / recall;
4. prints ``RESULT teacher_fd=.. reflow_fd_1step=.. distill_fd_1step=.. distill_align=.. straightness_before=..
   straightness_after=..`` (straightness: Liu et al.'s S of the guided teacher's flow and of the 2-rectified
   flow, from the reflow stage) and writes a grid: teacher, 2-RF one step, student one step.

Target (issue 19): distill_fd_1step <= 2x teacher_fd.

    python benchmarks/reflow_text2image.py --minutes 30
    python benchmarks/reflow_text2image.py --minutes 6 --eval_samples 500 reflow_lr=2e-4
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from common import parse_overrides, print_result, reflow_time_budget, run_reflow_stages, settings_argv
from sid_text2image import measure

from distill.reflow.stages import distill_source
from distill.teachers.loading import resolve_teacher_path
from distill.teachers.prompts import FASHION_CAPTIONS
from engine.config import parse_config
from engine.images import save_grid
from recipes.reflow import ReflowConfig

TEACHER = "fashion-sd"
#: a small-model setting for the 2.7M-parameter teacher (the rest are the recipe's defaults)
SMALL_MODEL = {
    "batch_size": 64,
    "pairs_shard_size": 250,  # the pairs budget is kept to a shard: small shards keep the time split honest
    "pairs_batch_size": 250,
    "log_every": 100,
    "log_with": "none",
    "progress_bar": "false",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="wall minutes of pairs + training")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="the teacher's CFG in the pairs")
    parser.add_argument("--eval_samples", type=int, default=2000, help="samples per wording and model")
    parser.add_argument("--eval_seed", type=int, default=0)
    parser.add_argument("--teacher_steps", type=int, default=25, help="DDIM steps of the measured teacher")
    parser.add_argument("--output_dir", default="outputs/bench_reflow_text2image")
    parser.add_argument("--resume", action="store_true", help="keep --output_dir and skip the done stages")
    parser.add_argument(
        "overrides", nargs="*", help="ReflowConfig fields, e.g. reflow_lr=2e-4 loss=pseudo_huber"
    )
    args = parser.parse_args()
    out = Path(args.output_dir)
    if out.exists() and not args.resume:
        shutil.rmtree(out)  # a benchmark times every stage: start from nothing
    settings = dict(
        SMALL_MODEL,
        output_dir=out,
        teacher=TEACHER,
        prompts=FASHION_CAPTIONS,
        guidance_scale=args.guidance_scale,
        **reflow_time_budget(args.minutes),
        eval_samples=min(args.eval_samples, 500),
        eval_nfes=1,
    )
    # the user's key=value overrides last, so they win; bad keys or values fail here, before any work
    cfg = parse_config(ReflowConfig, settings_argv(settings) + parse_overrides(args.overrides))

    start = time.perf_counter()
    results = run_reflow_stages(cfg)
    train_minutes = (time.perf_counter() - start) / 60

    teacher, teacher_images = measure(
        "teacher",
        resolve_teacher_path(TEACHER),
        args.eval_samples,
        args.eval_seed,
        args.teacher_steps,
        args.guidance_scale,
    )
    reflow, reflow_images = measure(
        "2-rectified flow", distill_source(cfg), args.eval_samples, args.eval_seed, 1, 1.0
    )
    student, student_images = measure(
        "student", out / "distill" / "student", args.eval_samples, args.eval_seed, 1, 1.0
    )
    grid = save_grid(
        torch.cat([teacher_images[:10], reflow_images[:10], student_images[:10]]),
        out / "teacher_reflow_student.png",
        10,
        3,
    )
    print(
        f"grid: {grid} (row 1 teacher {args.teacher_steps} steps CFG {args.guidance_scale:g}; row 2 2-RF one "
        "step; row 3 student one step; a class a column)"
    )
    before = results["reflow"]["straightness_before"]
    after = results["reflow"]["straightness_after"]
    print(
        f"train+pairs wall minutes={train_minutes:.1f} pairs={results['pairs_r1']['pairs']} "
        f"reflow_steps={results['reflow']['training_steps']} distill_steps={results['distill']['training_steps']}"
    )
    print(f"target: distill_fd_1step <= 2x teacher_fd: {student['fd'] <= 2 * teacher['fd']}")
    print_result(
        teacher_fd=teacher["fd"],
        teacher_align=teacher["align"],
        reflow_fd_1step=reflow["fd"],
        reflow_align=reflow["align"],
        distill_fd_1step=student["fd"],
        distill_align=student["align"],
        distill_align_heldout=student["align_heldout"],
        straightness_before=f"{before:.5f}",
        straightness_after=f"{after:.5f}",
        pairs=results["pairs_r1"]["pairs"],
        guidance_scale=args.guidance_scale,
        eval_samples=args.eval_samples,
        minutes=args.minutes,
    )


if __name__ == "__main__":
    main()
