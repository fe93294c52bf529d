"""Distil the default digits teacher with SiD for M minutes of wall time and compare with the teacher.

Measures the teacher's FD at 1, 4 and 35 NFE (Euler 1 and 4, Heun 35) and the EMA generator's FD along the run
(one step, or k with ``step_sigmas``), all on the same number of samples with fixed evaluation noise against
the held-out digits. Prints ``RESULT teacher_fd=.. student_fd=.. ratio=.. images=..`` (student_fd = the last
evaluation; the best one and the student's step count, student_nfe, are printed too) and writes a PNG of FD vs.
generated images seen with the teacher's figures as horizontal lines.

``--seeds 0,1,2`` runs the benchmark once per seed (same minutes, same evaluation noise, one teacher
measurement; run k in ``OUTPUT_DIR/seed<k>``), prints each run's RESULT line, then

    RESULT_SEEDS seeds=0,1,2 ratios=.. median_ratio=.. worst_ratio=.. median_student_fd=.. teacher_fd=..

    python benchmarks/sid_digits.py --minutes 30
    python benchmarks/sid_digits.py --minutes 30 --student lora
    python benchmarks/sid_digits.py --minutes 30 --seeds 0,1,2 lr_generator=3e-4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (
    parse_overrides,
    parse_seeds,
    plot_curves,
    print_result,
    reset_accelerate,
    seed_summary,
    settings_argv,
    teacher_reference,
)

from distill.evaluation.quality import digits_evaluator
from engine.config import parse_config
from engine.trainer import Trainer
from recipes.sid import SiDConfig, SiDRecipe

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def references(teacher: dict[int, float]) -> dict[str, float]:
    """Horizontal lines of the plots: the real-data floor and the teacher's FD at each measured NFE."""
    floor = {"real data floor (train vs held-out)": digits_evaluator().real_floor()["fd"]}
    return floor | {f"teacher, {nfe} NFE": fd for nfe, fd in sorted(teacher.items())}


def run_once(config: SiDConfig, teacher: dict[int, float], student: str, minutes: float) -> dict[str, float]:
    """Train one SiD run, print its history, wall-time and RESULT lines and plot it; return its figures."""
    start = time.perf_counter()
    trainer = Trainer(config, SiDRecipe(config))
    trainer.fit()
    elapsed = (time.perf_counter() - start) / 60
    history = trainer.recipe.quality.history
    last, best = history[-1], min(history, key=lambda h: h["fd"])
    for h in history:
        print(
            f"  images={int(h['images_seen'])} step={int(h['step'])} fd={h['fd']:.3f} "
            f"precision={h['precision']:.3f} recall={h['recall']:.3f}"
        )
    student_nfe = len(config.step_sigmas)  # 1 unless step_sigmas asks for a few-step student
    tag = f"SiD ({student}, {student_nfe}-step) on the default digits teacher, {minutes:g} min"
    plot_curves(
        Path(config.output_dir) / "fd_vs_images.png",
        {"SiD one-step generator (EMA)": [(h["images_seen"], h["fd"]) for h in history]},
        references=references(teacher),
        title=tag,
        xlabel="generated images seen",
    )
    print(
        f"wall minutes={elapsed:.1f} steps={trainer.step} best_fd={best['fd']:.3f} at images={int(best['images_seen'])}"
    )
    print_result(
        teacher_fd=teacher[35],
        student_fd=last["fd"],
        ratio=last["fd"] / teacher[35],
        images=trainer.images_seen,
        best_student_fd=best["fd"],
        teacher_fd_1nfe=teacher[1],
        student_nfe=student_nfe,
    )
    figures = {"student_fd": last["fd"], "ratio": last["fd"] / teacher[35], "history": history}
    del trainer
    reset_accelerate()  # the next seed's Trainer builds a fresh Accelerator
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="wall minutes of training per run")
    parser.add_argument("--student", choices=["full", "lora"], default="full")
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--eval-every", type=int, default=200, help="SiD iterations between evaluations")
    parser.add_argument("--output-dir", default="outputs/bench_sid_digits")
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated training seeds, one run each, then a RESULT_SEEDS summary line "
        "(default: one run with the config's seed)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="SiD config overrides on top of recipes/configs/sid_(lora_)digits.yaml, e.g. alpha=1.2 "
        "step_sigmas='2.5 0.8'",
    )
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if seeds is not None and any(o.partition("=")[0] == "seed" for o in args.overrides):
        raise SystemExit("give the seeds either as --seeds or as a seed=... override, not both")

    # the recipe's own digits config, so the benchmark measures what README's commands run
    config_file = CONFIGS / ("sid_lora_digits.yaml" if args.student == "lora" else "sid_digits.yaml")
    fixed = dict(
        output_dir=args.output_dir,
        max_steps=10**9,
        max_minutes=args.minutes,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        log_every=50,
        checkpoint_every=0,
    )
    argv = ["--config", str(config_file), *settings_argv(fixed), *parse_overrides(args.overrides)]
    # every run's config first: bad keys or values fail here, before the teacher is measured
    if seeds is None:
        configs = [parse_config(SiDConfig, argv)]
    else:
        configs = [
            parse_config(SiDConfig, [*argv, "--seed", str(s), "--output_dir", f"{args.output_dir}/seed{s}"])
            for s in seeds
        ]
    teacher = teacher_reference(args.eval_samples)
    runs = []
    for config in configs:
        if seeds is not None:
            print(f"# seed {config.seed}: {config.output_dir}", flush=True)
        runs.append(run_once(config, teacher, args.student, args.minutes))
    if seeds is None:
        return
    plot_curves(
        Path(args.output_dir) / "fd_vs_images_seeds.png",
        {f"seed {s}": [(h["images_seen"], h["fd"]) for h in r["history"]] for s, r in zip(seeds, runs)},
        references=references(teacher),
        title=f"SiD ({args.student}) on the default digits teacher, {args.minutes:g} min per seed",
        xlabel="generated images seen",
    )
    summary = seed_summary(seeds, [r["ratio"] for r in runs], [r["student_fd"] for r in runs])
    print_result("RESULT_SEEDS", **summary, teacher_fd=teacher[35])


if __name__ == "__main__":
    main()
